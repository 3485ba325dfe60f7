"""Counterfactual decodes (SPEC 9) on the tiny model: the intervention token is the argmax other than y_t, the
control of the last position is the completion itself, effects lie in {-1, 0, 1}, batching changes nothing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from arca.sampling.counterfactual import (
    alternative_tokens,
    choose_positions,
    greedy_continuations,
    probes_from_dump,
    token_effects,
)
from arca.sampling.rollouts import eos_token_ids, generate
from tests.params import default_params
from tests.tiny import tiny_model, tiny_tokenizer

BUDGET = 10
PROMPTS = {"p0": "What is 1 + 2?", "p1": "Add 3 and 4, then box it.", "p2": "Say hi"}


def _grade(text: str, answer: str) -> float:
    """A grader the random tiny model sometimes satisfies: the answer character appears in the completion."""
    return float(answer in text)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tokenizer = tiny_model().eval(), tiny_tokenizer()
    ids = sorted(PROMPTS)
    rollouts = generate(
        model,
        tokenizer,
        [PROMPTS[i] for i in ids],
        samples=3,
        max_new_tokens=BUDGET,
        greedy=False,
        seed=0,
        batch_size=4,
    )
    p = rollouts.prompt_length
    rows = []
    for n in range(len(rollouts.texts)):
        mask = rollouts.completion_mask[n, p:].bool()
        for pos, token in enumerate(rollouts.input_ids[n, p:][mask].tolist()):
            rows.append(
                {
                    "prompt_id": ids[int(rollouts.prompt_index[n])],
                    "sample": int(rollouts.sample[n]),
                    "step": 2,
                    "pos": pos,
                    "token_id": token,
                }
            )
    dump = pd.DataFrame(rows)
    answers = dict.fromkeys(ids, "e")
    return model, tokenizer, dump, answers


def test_positions_are_every_one_or_a_seeded_sample():
    assert choose_positions(4, 6, 0, "p", 0, 1) == [0, 1, 2, 3]
    picked = choose_positions(30, 6, 0, "p", 0, 1)
    assert len(picked) == 6 == len(set(picked)) and picked == sorted(picked)
    assert picked == choose_positions(30, 6, 0, "p", 0, 1) != choose_positions(30, 6, 0, "p", 1, 1)


def test_intervention_token_is_the_best_other_token(setup):
    model, tokenizer, dump, answers = setup
    _, probes = probes_from_dump(tokenizer, dump, PROMPTS, answers, max_positions=100, seed=0)
    alts = alternative_tokens(model, probes, tokenizer.pad_token_id, batch_size=4)
    for probe, alt in zip(probes, alts):
        ids = torch.tensor([probe.prompt_ids + probe.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]  # (L, V), unpadded
        for t, a in zip(probe.positions, alt):
            row = logits[len(probe.prompt_ids) + t - 1].clone()
            assert a != probe.completion_ids[t]
            row[probe.completion_ids[t]] = -torch.inf
            assert a == int(row.argmax())


def test_effects_control_and_batching(setup):
    model, tokenizer, dump, answers = setup
    keys, probes = probes_from_dump(tokenizer, dump, PROMPTS, answers, max_positions=4, seed=0)
    eos = eos_token_ids(model.generation_config, tokenizer)
    runs = [
        token_effects(model, tokenizer, probes, _grade, max_completion_length=BUDGET, eos_ids=eos, batch_size=b)
        for b in (1, 5, 64)
    ]
    assert runs[0] == runs[1] == runs[2]
    rows = pd.DataFrame(runs[0])
    assert set(rows["effect"]) <= {-1.0, 0.0, 1.0} and (rows["decisive"] == (rows["effect"] != 0)).all()
    assert (rows["control_tokens"] <= BUDGET).all() and (rows["intervention_tokens"] <= BUDGET).all()
    assert len(rows) == sum(len(p.positions) for p in probes) and len(keys) == len(probes) == 9
    for k, probe in enumerate(probes):  # the control of the last position is the completion itself
        text = tokenizer.decode(probe.completion_ids, skip_special_tokens=True)
        last = len(probe.completion_ids) - 1
        cont = greedy_continuations(
            model,
            [probe.prompt_ids],
            [probe.completion_ids],
            max_completion_length=BUDGET,
            eos_ids=eos,
            pad_id=tokenizer.pad_token_id,
            batch_size=1,
        )
        assert cont == [probe.completion_ids]
        if last in probe.positions:
            assert rows[(rows["probe"] == k) & (rows["pos"] == last)]["r0"].item() == _grade(text, "e")


def test_greedy_completion_is_its_own_control_everywhere(setup):
    model, tokenizer, _, _ = setup
    ids = sorted(PROMPTS)
    rollouts = generate(model, tokenizer, [PROMPTS[i] for i in ids], samples=1, max_new_tokens=BUDGET, greedy=True)
    p = rollouts.prompt_length
    eos = eos_token_ids(model.generation_config, tokenizer)
    for n in range(len(ids)):
        completion = rollouts.input_ids[n, p:][rollouts.completion_mask[n, p:].bool()].tolist()
        prompt = rollouts.input_ids[n, :p][rollouts.attention_mask[n, :p].bool()].tolist()
        prefixes = [completion[: t + 1] for t in range(len(completion))]
        out = greedy_continuations(
            model,
            [prompt] * len(prefixes),
            prefixes,
            max_completion_length=BUDGET,
            eos_ids=eos,
            pad_id=tokenizer.pad_token_id,
            batch_size=3,
        )
        assert all(o == completion for o in out)  # greedy from its own prefix: the same greedy completion


def test_stage_runs_on_a_tiny_setup(setup, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from peft import LoraConfig, get_peft_model

    from stages.faithfulness import main

    _, tokenizer, dump, answers = setup
    monkeypatch.chdir(tmp_path)
    tiny_model().save_pretrained("data/models/base")
    tokenizer.save_pretrained("data/models/base")
    adapter = get_peft_model(tiny_model(), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    adapter.save_pretrained("data/runs/arca-r2-s0/adapters/step-000002")
    ids = sorted(PROMPTS)
    Path("data/prepared").mkdir(parents=True)
    probe = {"prompt_id": ids, "prompt": [PROMPTS[i] for i in ids], "answer": [answers[i] for i in ids]}
    pd.DataFrame(probe).to_parquet("data/prepared/probe.parquet")
    weights = {"w_uniform": 1.0, "w_arca": dump["pos"].to_numpy() % 3 + 0.5}
    Path("data/dumps").mkdir()
    dump.assign(run="arca-r2-s0", **weights).to_parquet("data/dumps/arca-r2-s0.parquet")
    params = {
        "model": {"dtype": "float32", "chat_template_kwargs": {}},
        "train": {"max_completion_length": BUDGET, "grader": "exact"},
        "faithfulness": {"steps": "final", "max_positions": 3, "batch_size": 8, "seed": 0},
    }
    params = default_params(params)  # the stage validates the whole file first
    Path("params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(main, ["--run", "arca-r2-s0"])
    assert result.exit_code == 0, result.output
    effects = pd.read_parquet("data/faithfulness/arca-r2-s0/effects.parquet")
    assert len(effects) == 9 * 3 and set(effects["step"]) == {2} and set(effects["effect"]) <= {-1.0, 0.0, 1.0}
    assert (effects["token_id"] != effects["alt_token_id"]).all()
    scores = pd.read_parquet("data/faithfulness/arca-r2-s0/scores.parquet")
    assert set(scores["signal"]) == {"uniform", "uniform (permuted)", "arca", "arca (permuted)"}
    params["faithfulness"]["steps"] = [5]
    Path("params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(main, ["--run", "arca-r2-s0"])
    assert result.exit_code == 1 and "faithfulness.steps [5]" in result.output and "Traceback" not in result.output
