"""bench/gpu_check.py rehearsed on the CPU (`--tiny`): the paper profile's step through `run_training` for every
checked method, one final line, a JSON the planner reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from bench.gpu_check import METHODS, NOISE_SIGNALS, final_line
from stages.plan import main as plan_cli

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_check_prints_one_line_and_a_json_the_planner_reads(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--tiny", "--steps", "2", "--json", str(out)]
    done = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    last = done.stdout.strip().splitlines()[-1]
    assert last == final_line(result) and last.startswith("gpu_check: CPU, tiny Qwen3 bf16 random, r64")
    assert set(result["step_s"]) == set(METHODS) and result["step_ratio"]["uniform"] == 1.0
    # LoRA B = 0 at the first step: every reference-comparing or LoRA salience is exactly 0 in bf16 (SPEC 2b)
    assert result["fallback_step0"] == {m: 1.0 for m in METHODS if m != "uniform"}
    assert set(result["noise_share"]) == set(NOISE_SIGNALS) and result["peak_gib"] is None
    assert result["train_tokens_per_s"] > 0 and result["generate_tokens_per_s"] > 0
    planned = CliRunner().invoke(plan_cli, ["--profile", "paper", "--gpu-check", str(out)])
    assert planned.exit_code == 0 and f"{result['train_tokens_per_s']:,.0f} generated tokens/s" in planned.output
