"""bench/gpu_check.py rehearsed on the CPU (`--tiny`): the paper profile's step through `run_training` for every
checked method, one final line, a JSON the planner reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from bench.gpu_check import (
    FIRST,
    METHODS,
    NOISE_SIGNALS,
    check_plan,
    final_line,
    memory_columns,
    memory_line,
    paper_params,
)
from stages.plan import main as plan_cli
from stages.profile import compose

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_check_prints_one_line_and_a_json_the_planner_reads(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--tiny", "--json", str(out)]  # the first run's 2-step mode
    done = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    last = done.stdout.strip().splitlines()[-1]
    assert last == final_line(result) and last.startswith("gpu_check: CPU, tiny Qwen3 bf16 random, r64")
    # the memory columns on the CPU: None (all methods share one process, so no RSS peak is a method's own)
    assert done.stdout.strip().splitlines()[-2] == memory_line(result)
    assert memory_line(result) == "peak memory: arca n/a over uniform (beta>0), n/a (beta=0)"
    assert result["peak_over_uniform_mib"] == {"0.0": dict.fromkeys(FIRST)} and result["beta"] == 0.0
    assert set(result["step_s"]) == set(FIRST) and result["step_ratio"]["uniform"] == 1.0
    assert result["measured_steps"] == 1  # 2 steps, the first a warm-up
    # LoRA B = 0 at the first step: every reference-comparing or LoRA salience is exactly 0 in bf16 (SPEC 2b)
    assert result["fallback_step0"] == {m: 1.0 for m in FIRST if m != "uniform"}
    assert result["evaluate_tokens_per_s"] > 0 and result["evaluate_unmerged_tokens_per_s"] > 0
    assert set(result["noise_share"]) == set(NOISE_SIGNALS) and result["peak_gib"] is None
    assert result["train_tokens_per_s"] > 0 and result["generate_tokens_per_s"] > 0
    planned = CliRunner().invoke(plan_cli, ["--profile", "paper", "--gpu-check", str(out)])
    assert planned.exit_code == 0 and f"{result['train_tokens_per_s']:,.0f} generated tokens/s" in planned.output
    assert f"{result['evaluate_tokens_per_s']:,.0f} in evaluation" in planned.output


def test_first_run_is_two_steps_of_two_methods_and_full_is_every_method():
    assert check_plan(False, None, None) == (2, list(FIRST))
    assert check_plan(True, None, None) == (3, list(METHODS))
    assert check_plan(True, 5, "arca, kl") == (5, ["arca", "kl"])


def test_paper_params_compose_as_dvc_does_without_dvc():
    """The device machine has no DVC or Hydra: the check composes the profile itself, to the same params."""
    assert paper_params() == compose("paper")


def test_memory_columns_are_each_peak_minus_uniforms_at_its_beta():
    """On a GPU: per beta, a method's peak minus uniform's peak at the same beta, and the summary line from them."""
    memory = {
        0.0: {"uniform": {"peak_gib": 10.0}, "arca": {"peak_gib": 10.5}},
        0.04: {"uniform": {"peak_gib": 12.0}, "arca": {"peak_gib": 11.75}},
    }
    columns = memory_columns(memory)
    assert columns["peak_mib"]["0.0"] == {"uniform": 10240.0, "arca": 10752.0}
    assert columns["peak_over_uniform_mib"] == {
        "0.0": {"uniform": 0.0, "arca": 512.0},
        "0.04": {"uniform": 0.0, "arca": -256.0},
    }
    assert memory_line(columns) == "peak memory: arca -256.0 MiB over uniform (beta>0), +512.0 MiB (beta=0)"
    only_zero = memory_columns({0.0: memory[0.0]})
    assert memory_line(only_zero) == "peak memory: arca n/a over uniform (beta>0), +512.0 MiB (beta=0)"
