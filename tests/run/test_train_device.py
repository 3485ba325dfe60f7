"""`train.device` (issue 22, fix 3) and the multi-process GRPOConfig (fix 7).

A GPU profile (`device: cuda`) on a machine where torch sees no CUDA device (an old driver for the pinned
torch's default wheel, or a venv with the CPU build) used to train on the CPU without a word; now the library,
`validate` and the train stage refuse, naming the key, the torch build and the fix.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from arca.credit.config import CreditConfig
from arca.run.settings import SettingError, TrainSettings, resolve_device
from arca.run.training import grpo_config
from stages import train as train_stage
from stages import validate as validate_stage
from stages.profile import compose

ROOT = Path(__file__).resolve().parents[2]


def settings(tmp_path: Path, **overrides) -> TrainSettings:
    return TrainSettings(
        model_dir=tmp_path / "no-model",
        train_path=tmp_path / "no-data.parquet",
        output_dir=tmp_path / "run",
        prompts_per_step=2,
        num_generations=4,
        **overrides,
    )


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve_device(no_cuda, monkeypatch):
    assert resolve_device("cpu") == resolve_device("auto") == "cpu"
    with pytest.raises(SettingError) as err:
        resolve_device("cuda")
    assert err.value.field == "device"
    assert f"torch {torch.__version__}" in str(err.value) and "docs/profiles.md, GPU section" in str(err.value)
    assert (f"CUDA {torch.version.cuda}" if torch.version.cuda else "the CPU build") in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == "cuda"
    assert resolve_device("cpu") == "cpu"  # an explicit cpu stays on the CPU where a GPU is present
    with pytest.raises(SettingError, match="device must be one of auto, cuda, cpu"):
        settings(Path("."), device="gpu")


def test_grpo_config_never_falls_back_to_the_cpu(tmp_path, no_cuda):
    credit = CreditConfig(method="uniform")
    assert grpo_config(settings(tmp_path, device="cpu"), credit, world_size=1).use_cpu
    assert grpo_config(settings(tmp_path, device="auto"), credit, world_size=1).use_cpu
    with pytest.raises(SettingError, match=r"TrainSettings\.device is cuda but torch"):
        grpo_config(settings(tmp_path, device="cuda"), credit, world_size=1)


def test_several_processes_skip_ddps_unused_parameter_search(tmp_path, no_cuda):
    """A `PeftModel` is no `PreTrainedModel`: left at None, transformers turns find_unused_parameters on."""
    credit = CreditConfig(method="arca")
    assert grpo_config(settings(tmp_path, device="cpu"), credit, world_size=2).ddp_find_unused_parameters is False
    assert grpo_config(settings(tmp_path, device="cpu"), credit, world_size=1).ddp_find_unused_parameters is None


def paper_params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(compose("paper")))
    return path


def test_train_stage_fails_on_a_gpu_profile_without_cuda_before_any_model_loads(tmp_path, monkeypatch, no_cuda):
    params = paper_params(tmp_path)
    monkeypatch.chdir(tmp_path)  # no data/models/base here: the device check must come first
    start = time.monotonic()
    result = CliRunner().invoke(train_stage.main, ["--method", "arca", "--rank", "64", "--params", str(params)])
    assert time.monotonic() - start < 30
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: params.yaml: train.device is cuda but torch"), lines
    assert "set it to cpu" in lines[0]


def test_validate_fails_on_a_gpu_profile_without_cuda(tmp_path, no_cuda):
    params = paper_params(tmp_path)
    args = ["--params", str(params), "--out", str(tmp_path / "valid")]  # validate runs before base: no model
    result = CliRunner().invoke(validate_stage.main, args)
    assert result.exit_code == 1 and "params.yaml: train.device is cuda but torch" in result.output
    raw = yaml.safe_load(params.read_text())
    raw["train"]["device"] = "cpu"
    params.write_text(yaml.safe_dump(raw))
    assert CliRunner().invoke(validate_stage.main, args).exit_code == 0


def test_profiles_name_their_device():
    devices = {p: compose(p)["train"]["device"] for p in ("embedded", "paper", "study")}
    assert devices == {"embedded": "cpu", "paper": "cuda", "study": "cuda"}
