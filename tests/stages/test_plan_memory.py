"""The planner's memory lines: the estimate for the active or a named profile, where the architecture comes from,
and the peaks bench/gpu_check.py measured beside it."""

from __future__ import annotations

import json

from click.testing import CliRunner

from arca.models.tiny import tiny_model
from arca.run.memory import GIB, Architecture, peak_bytes
from stages.plan import QWEN3_CONFIG, training_shape
from stages.plan import main as plan_cli
from stages.profile import compose


def test_paper_profile_prints_the_estimate_of_its_largest_run():
    params = compose("paper")
    shape, notes = training_shape(params, 64)
    assert (shape.micro_batch, shape.rollouts, shape.prompt_tokens, shape.dtype) == (8, 32, 512, "bfloat16")
    assert notes == [] and shape.lora_dropout == 0.05 and not shape.gradient_checkpointing
    arch = Architecture.from_config(json.loads(QWEN3_CONFIG.read_text()))
    largest = max(peak_bytes(arch, shape, spec["method"])["peak"] for spec in params["study"]["runs"].values())
    done = CliRunner().invoke(plan_cli, ["--profile", "paper"])
    assert done.exit_code == 0, done.output
    line = next(x for x in done.output.splitlines() if x.startswith("peak GPU memory per training process"))
    assert f": {largest / GIB:.1f} GiB for " in line and "bench/qwen3_1_7b_base_config.json" in line
    by_method = next(x for x in done.output.splitlines() if "by method" in x)
    assert all(spec["method"] in by_method for spec in params["study"]["runs"].values())


def test_unknown_model_and_an_explicit_config(tmp_path):
    done = CliRunner().invoke(plan_cli, ["--profile", "paper", "-S", "model.hub_id=someone/other-model"])
    assert done.exit_code == 0 and "unknown model config" in done.output
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_model(512).config.to_dict()))
    explicit = ["--profile", "paper", "-S", "model.hub_id=someone/other-model", "--model-config", str(config)]
    done = CliRunner().invoke(plan_cli, explicit)
    assert done.exit_code == 0 and f"model config {config}" in done.output


def test_measured_peaks_are_printed_beside_the_estimate(tmp_path):
    check = {
        "device": "NVIDIA H200",
        "model": "Qwen3-1.7B",
        "peak_gib": 30.25,
        "peak_over_uniform_mib": {"0.0": {"uniform": 0.0, "arca": 512.0}},
    }
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(check))
    done = CliRunner().invoke(plan_cli, ["--profile", "paper", "--gpu-check", str(path)])
    assert done.exit_code == 0, done.output
    assert "NVIDIA H200, Qwen3-1.7B, paper profile at r64): peak 30.2 GiB; over uniform: arca +512 MiB" in done.output
    path.write_text(json.dumps({**check, "peak_gib": None}))  # the --tiny rehearsal: no GPU memory
    done = CliRunner().invoke(plan_cli, ["--profile", "paper", "--gpu-check", str(path)])
    assert "no peak GPU memory (a CPU rehearsal)" in done.output
