"""Train one LoRA-GRPO run with one credit method; resumes from the run's last checkpoint if there is one.

    python -m stages.train --method arca --rank 8 --seed 0 [--params params.yaml] [--out data/runs/arca-r8-s0]

Reads params.yaml `model.{dtype, chat_template_kwargs}`, `lora`, `train`, `credit` and `diagnostics`, the base
model in data/models/base and the prompts in data/prepared/train.parquet; writes the run directory described
in `arca.training`. Every param is validated before the model loads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from stages.common import credit_config, load_params, section

MODEL_DIR = Path("data/models/base")
TRAIN_PATH = Path("data/prepared/train.parquet")
# params.yaml `train:` keys -> TrainSettings fields (same names).
TRAIN_KEYS = (
    "learning_rate",
    "max_steps",
    "prompts_per_step",
    "num_generations",
    "max_completion_length",
    "beta",
    "temperature",
    "top_p",
    "top_k",
    "loss_type",
    "save_steps",
    "logging_steps",
    "gradient_accumulation_steps",
    "use_vllm",
)
FLOAT_KEYS = ("learning_rate", "beta", "temperature", "top_p", "lora_alpha", "lora_dropout")


def _as_float(value: Any, key: str) -> Any:
    """YAML reads `1e-5` (no dot) as a string; accept it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"params.yaml: {key} must be a number, got {value!r}") from None
    return value


def settings_from_params(params: dict[str, Any], method: str, rank: int, seed: int, out: Path):
    """(`TrainSettings`, `CreditConfig`) from params.yaml, validated; nothing heavy is imported or loaded."""
    from arca.training import TrainSettings

    credit = credit_config(params, method)
    lora, train = section(params, "lora"), section(params, "train")
    model = params.get("model") or {}
    fields: dict[str, Any] = {k: train[k] for k in TRAIN_KEYS if k in train}
    fields.update({f"lora_{k}": lora[k] for k in ("alpha", "dropout") if k in lora})
    if "target_modules" in lora:
        modules = lora["target_modules"]
        fields["target_modules"] = tuple(modules) if isinstance(modules, list) else modules
    for key in FLOAT_KEYS:
        if key in fields:
            source = f"lora.{key[5:]}" if key.startswith("lora_") else f"train.{key}"
            fields[key] = _as_float(fields[key], source)
    if "dtype" in model:
        fields["dtype"] = model["dtype"]
    if model.get("chat_template_kwargs") is not None:
        fields["chat_template_kwargs"] = model["chat_template_kwargs"]
    settings = TrainSettings(model_dir=MODEL_DIR, train_path=TRAIN_PATH, output_dir=out, seed=seed, rank=rank, **fields)
    return settings, credit


@click.command()
@click.option("--method", required=True, help="credit method, one of arca.credit_config.METHODS")
@click.option("--rank", required=True, type=int, help="LoRA rank")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option(
    "--out", default=None, type=click.Path(file_okay=False), help="default data/runs/<method>-r<rank>-s<seed>"
)
def main(method: str, rank: int, seed: int, params_path: str, out: str | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = Path(out) if out else Path("data/runs") / f"{method}-r{rank}-s{seed}"
    try:
        settings, credit = settings_from_params(load_params(params_path), method, rank, seed, out_dir)
        for path, what in ((MODEL_DIR, "base model directory"), (TRAIN_PATH, "train parquet")):
            if not path.exists():
                raise ValueError(f"{what} {path} does not exist; run the stage that writes it first (dvc repro)")
    except (ValueError, TypeError, OSError) as err:
        raise click.ClickException(str(err)) from err
    from arca.training import run_training  # heavy imports (torch, TRL) only after validation

    metrics = run_training(settings, credit)
    click.echo(f"{out_dir}: {metrics.get('steps')} steps, tail reward {metrics.get('reward_tail')}")


if __name__ == "__main__":
    main()
