"""bench/step_overhead.py still drives every method through the trainer it times (its timing hooks name trainer
methods, so a renamed method must fail here, not in the next `make bench`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset

from arca.credit.config import METHODS
from bench.step_overhead import BenchSize, measure, paired_ratio, table

TINY = BenchSize(vocab=64, completion_tokens=3, prompt_words=4, warmup_rounds=0, rounds=1)


@pytest.mark.parametrize("beta", [0.04, 0.0])
def test_one_round_of_every_method(tmp_path: Path, beta: float):
    prompts = [[{"role": "user", "content": "w1 w2 w3 w4"}], [{"role": "user", "content": "w5 w6 w7 w8"}]]
    result = measure(beta, TINY, Dataset.from_dict({"prompt": prompts}), tmp_path, METHODS)
    assert set(result) == set(METHODS)
    assert all(len(r["step"]) == TINY.rounds for r in result.values())
    assert all(r["step"][0] > 0 and r["step"][0] >= r["non_gen"][0] >= 0 for r in result.values())
    assert result["arca"]["credit"][0] > 0 and result["kl"]["credit"][0] > 0  # the credit code ran, and was timed
    assert table({beta: result}).count("\n") == len(METHODS) + 1


def test_paired_ratio_interval():
    base = [1.0, 2.0, 0.5, 1.5]  # the load moves both methods of a round alike: the paired ratio stays exact
    assert paired_ratio([1.05 * b for b in base], base) == pytest.approx((1.05, 1.05, 1.05))
    noisy = [1.0, 1.1, 0.9, 1.2, 1.0, 0.95, 1.05, 1.3]
    median, lo, hi = paired_ratio(noisy, [1.0] * len(noisy))
    assert lo < median < hi and lo >= 0.9 and hi <= 1.3
    assert paired_ratio(noisy, [1.0] * len(noisy)) == (median, lo, hi)  # seeded
