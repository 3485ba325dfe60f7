"""The dump stage samples and grades its probe rollouts exactly as its run trained: `train.top_p` / `top_k` filter
the sampling, `train.grader` gives the rewards and advantages (issue 17: both were ignored before)."""

from __future__ import annotations

import pandas as pd
import pytest

import arca.sampling.rollouts as rollouts  # the dump stage imports generate from here when it runs
from stages.dump import dump_run
from tests.sampling.test_vllm_rollouts import _dump_workspace

META = {"run": "arca-r4-s0", "method": "arca", "rank": 4, "seed": 0}


def test_dump_samples_with_the_runs_top_k(tmp_path, monkeypatch):
    """top_k = 1 turns sampling greedy: every sample of a prompt is the same completion. Unfiltered sampling (the
    old dump, whatever the run trained with) gives different samples on the same seeds."""
    params = _dump_workspace(tmp_path, monkeypatch)
    free = dump_run("arca-r4-s0", META, params, [], "hf")
    params["train"].update(top_k=1, top_p=None)
    greedy = dump_run("arca-r4-s0", META, params, [], "hf")
    for frame, same in ((greedy, True), (free, False)):
        for _, rows in frame.groupby(["step", "prompt_id"]):
            texts = {tuple(g["token_id"]) for _, g in rows.groupby("sample")}
            assert (len(texts) == 1) == same


def test_dump_passes_the_runs_top_p(tmp_path, monkeypatch):
    params = _dump_workspace(tmp_path, monkeypatch)
    params["train"].update(top_p=0.95, top_k=7)
    seen = []
    real = rollouts.generate

    def recording(*args, **kwargs):
        seen.append((kwargs["top_p"], kwargs["top_k"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(rollouts, "generate", recording)
    dump_run("arca-r4-s0", META, params, [], "hf")
    assert seen and set(seen) == {(0.95, 7)}


@pytest.mark.parametrize("grader, reward", [("math_verify", 1.0), ("exact", 0.0), (None, 1.0)])
def test_dump_grades_with_the_runs_grader(tmp_path, monkeypatch, grader, reward):
    """`\\boxed{\\frac{1}{2}}` against the reference `0.5`: equivalent for math-verify, not equal for the paper's
    exact match. The dump's rewards follow `train.grader` (absent: math_verify, the schema default)."""
    params = _dump_workspace(tmp_path, monkeypatch)
    params["train"]["grader"] = grader
    if grader is None:
        del params["train"]["grader"]
    real = rollouts.generate

    def boxed_half(*args, **kwargs):
        rollouts = real(*args, **kwargs)
        rollouts.texts = ["so \\boxed{\\frac{1}{2}}"] * len(rollouts.texts)
        return rollouts

    monkeypatch.setattr(rollouts, "generate", boxed_half)
    probe = pd.read_parquet("data/prepared/probe.parquet").assign(answer="0.5")
    probe.to_parquet("data/prepared/probe.parquet")
    df = dump_run("arca-r4-s0", META, params, [], "hf")
    assert set(df["reward"]) == {reward}
