"""The planner prices evaluation at its own rate: HF decoding with the adapter merged (issue 22, fix 6)."""

from __future__ import annotations

import json

import pytest

from stages.plan import DEFAULT_GENERATE_TOKENS_PER_S, StageCost, Throughput, throughput


def test_evaluation_has_its_own_rate():
    cost = StageCost("evaluate", runs=1, rollouts=10, tokens=3600 * 4000)
    assert cost.gpu_hours(Throughput(generate=2000.0, evaluate=4000.0)) == pytest.approx(1.0)
    assert StageCost("dump", 1, 10, 3600 * 2000).gpu_hours(Throughput(generate=2000.0, evaluate=4000.0)) == 1.0
    assert Throughput().evaluate == 2 * DEFAULT_GENERATE_TOKENS_PER_S


def test_throughput_reads_the_evaluation_figure_of_gpu_check(tmp_path):
    path = tmp_path / "gpu_check.json"
    path.write_text(
        json.dumps({"train_tokens_per_s": 900, "generate_tokens_per_s": 1500, "evaluate_tokens_per_s": 5000})
    )
    assert throughput(None, None, str(path)) == Throughput(train=900, generate=1500, evaluate=5000)
    assert throughput(None, None, str(path), evaluate=7000).evaluate == 7000
    path.write_text(json.dumps({"train_tokens_per_s": 900, "generate_tokens_per_s": 1500}))  # an older check
    assert throughput(None, None, str(path)).evaluate == 3000
