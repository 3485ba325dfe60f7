"""Tests for arca.sampling.evaluation and the evaluate stage's params: greedy pass@1, mean@k and pass@k under both
graders, raw and chat prompts on a tiny model, sampling params validated with the key named."""

from __future__ import annotations

import json
from functools import partial
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from arca.sampling.evaluation import PREFIXES, evaluate, summarize
from stages.evaluate import check, sampling
from stages.evaluate import main as evaluate_cli
from tests.params import default_params
from tests.tiny import tiny_model, tiny_tokenizer

PROBLEMS = pd.DataFrame(
    {
        "prompt_id": ["a", "b", "c"],
        "eval_set": ["math", "math", "other"],
        "prompt": ["What is 1/2?\n", "What is 2+2?\n", "What is 3?\n"],
        "answer": [r"\frac{1}{2}", "4", "3"],
    }
)
# Greedy: a is right only by math-verify (0.5 = 1/2), b is right, c is wrong.
GREEDY = [r"\boxed{0.5}", r"\boxed{4}", r"\boxed{5}"]
# k = 2 samples per problem: a: one hit; b: none; c: both right by exact (`3.` loses its period), one by math-verify.
SAMPLED = [r"\boxed{\dfrac{1}{2}}", "no box", r"\boxed{5}", r"\boxed{four}", r"\boxed{3}", r"\boxed{3.}"]


def fake_generate(model, tokenizer, prompts, *, samples, greedy, **kwargs):
    texts = GREEDY if greedy else SAMPLED
    assert len(texts) == len(prompts) * samples
    index = torch.arange(len(prompts)).repeat_interleave(samples)
    return SimpleNamespace(prompt_index=index, texts=list(texts))


def test_scores_under_both_graders():
    rows = evaluate(None, None, PROBLEMS, k=2, max_new_tokens=4, sample=partial(fake_generate, None, None))
    assert list(rows.columns) == [
        "prompt_id",
        "eval_set",
        "greedy",
        "mean_k",
        "pass_k",
        "exact_greedy",
        "exact_mean_k",
        "exact_pass_k",
        "completion",
    ]
    assert rows["greedy"].tolist() == [1.0, 1.0, 0.0]
    assert rows["exact_greedy"].tolist() == [0.0, 1.0, 0.0]
    assert rows["mean_k"].tolist() == [0.5, 0.0, 0.5] and rows["pass_k"].tolist() == [1.0, 0.0, 1.0]
    assert rows["exact_mean_k"].tolist() == [0.5, 0.0, 1.0] and rows["exact_pass_k"].tolist() == [1.0, 0.0, 1.0]
    assert rows["completion"].tolist() == GREEDY
    summary = summarize(rows, k=2)
    assert summary["math"] == {
        "pass@1": 1.0,
        "mean@2": 0.25,
        "pass_at_k": 0.5,
        "exact_pass@1": 0.5,
        "exact_mean@2": 0.25,
        "exact_pass_at_k": 0.5,
        "n": 2,
    }
    assert summary["other"]["pass_at_k"] == 1.0 and summary["other"]["pass@1"] == 0.0
    assert set(PREFIXES) == {"math_verify", "exact"}


def test_k_zero_is_greedy_only():
    rows = evaluate(None, None, PROBLEMS, k=0, max_new_tokens=4, sample=partial(fake_generate, None, None))
    assert (rows[["mean_k", "pass_k", "exact_mean_k", "exact_pass_k"]] == 0.0).all().all()
    assert summarize(rows, k=0)["math"]["pass@1"] == 1.0


@pytest.mark.parametrize("prompts", ["raw", "chat"])
def test_tiny_model_end_to_end(prompts):
    problems = PROBLEMS.copy()
    if prompts == "chat":
        problems["prompt"] = [[{"role": "user", "content": p}] for p in PROBLEMS["prompt"]]
    kwargs = {"k": 2, "max_new_tokens": 3, "top_p": 0.95, "top_k": 50, "seed": 1, "batch_size": 4}
    rows = evaluate(tiny_model(), tiny_tokenizer(), problems, **kwargs)
    again = evaluate(tiny_model(), tiny_tokenizer(), problems, **kwargs)
    assert len(rows) == 3 and rows.equals(again)  # seeded
    assert set(rows["greedy"]) <= {0.0, 1.0} and set(rows["exact_pass_k"]) <= {0.0, 1.0}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"top_p": 0}, r"evaluate\.top_p must be null or in \(0, 1\], got 0"),
        ({"top_p": 1.5}, r"evaluate\.top_p must be null or in \(0, 1\]"),
        ({"top_k": -1}, r"evaluate\.top_k must be null or an int >= 0, got -1"),
        ({"top_k": 2.5}, r"evaluate\.top_k must be null or an int >= 0"),
        ({"temperature": 0}, r"evaluate\.temperature must be > 0"),
        ({"k": -1}, r"evaluate\.k must be a non-negative int"),
    ],
)
def test_evaluate_params_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        check({"k": 4, "max_new_tokens": 8, "batch_size": 2, **overrides})


def test_sampling_defaults_and_paper_values():
    assert sampling({}) == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # unfiltered, as before
    assert sampling({"temperature": 1.0, "top_p": 0.95, "top_k": None}) == {
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 0,
    }
    assert sampling({"temperature": "6e-1", "top_p": "0.95", "top_k": 50})["temperature"] == 0.6


def test_stage_writes_both_graders(tmp_path, monkeypatch):
    """The evaluate stage on a tiny base model and raw prompts: JSON keeps pass@1 / mean@k / n and adds the rest."""
    monkeypatch.chdir(tmp_path)
    tiny_model().save_pretrained(tmp_path / "data/models/base")
    tiny_tokenizer().save_pretrained(tmp_path / "data/models/base")
    (tmp_path / "data/prepared").mkdir(parents=True)
    PROBLEMS.to_parquet(tmp_path / "data/prepared/eval.parquet")
    block = {"k": 2, "max_new_tokens": 3, "temperature": 1.0, "top_p": 0.95, "top_k": 50, "batch_size": 4}
    params = default_params({"model": {"dtype": "float32"}, "evaluate": {**block, "primary": "math"}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))  # the whole file, validated first
    result = CliRunner().invoke(evaluate_cli, ["--base"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "data/eval/base.json").read_text())
    assert set(summary["sets"]["math"]) == {
        "pass@1",
        "mean@2",
        "pass_at_k",
        "exact_pass@1",
        "exact_mean@2",
        "exact_pass_at_k",
        "n",
    }
    assert summary["primary"] == "math" and "exact_pass_at_k" in summary and summary["k"] == 2
    rows = pd.read_parquet(tmp_path / "data/eval/base.parquet")
    assert len(rows) == 3 and "exact_pass_k" in rows.columns
