"""examples/grpo_arca.py runs as a script: `--help` lists the credit flags, and one step on the tiny model trains,
logs the credit diagnostics and saves the adapter."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grpo_arca.py"


def run_example(monkeypatch, *argv: str) -> None:
    """Run the example as `python examples/grpo_arca.py ARGV` would, in this process (imports already warm)."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), *argv])
    runpy.run_path(str(EXAMPLE), run_name="__main__")


def test_help_lists_credit_and_lora_flags(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exited:
        run_example(monkeypatch, "--help")
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--credit_method", "--credit_scheme", "--credit_reference", "--lora_r", "--model_name_or_path"):
        assert flag in out, flag


def test_one_step_on_the_tiny_model(monkeypatch, tmp_path):
    out = tmp_path / "run"
    run_example(
        monkeypatch,
        *("--model_name_or_path", "tiny", "--output_dir", str(out), "--max_steps", "1", "--bf16", "false"),
        *("--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "12"),
        *("--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none"),
        *("--credit_method", "arca", "--lora_r", "4", "--disable_tqdm", "true"),
    )
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    logged = state["log_history"][0]
    assert "rewards/accuracy/mean" in logged
    assert logged["credit/fallback_rate"] == 1.0  # step 0: LoRA B = 0, every ARCA residual is 0 (SPEC 3)
