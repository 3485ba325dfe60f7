"""Stage `check_model`: the params checks that need the base model, right after `base` and before `prepare` or
any train cell: every ARCA layer index exists in it, and every `lora.target_modules` entry names a module of it.

    python -m stages.check_model [--params params.yaml] [--model data/models/base] [--out data/model.valid]

The model is built from its config.json on the meta device (module names, no weights: about a second), so a
`target_modules` typo fails here by key, not after the first train cell has loaded the model and PEFT has said
"Target modules ... not found" without naming the key. The output's bytes never change, so a passing check
reruns nothing downstream.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from stages.common import check_layer, load_valid

VALID = "params.yaml fits the base model in data/models/base\n"  # constant: a passing check reruns nothing
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head


def check_layers(params, config: dict) -> None:
    """Every ARCA layer index (`credit.layer`, `credit.methods.<m>.layer`) exists in the model of `config`."""
    layers = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
    check_layer(params.credit.layer, layers, "credit.layer")
    for method, block in params.credit.methods.items():
        if block.layer is not None:
            check_layer(block.layer, layers, f"credit.methods.{method}.layer")


def linear_names(model_dir: Path) -> list[str]:
    """Full names of the model's linear layers (what LoRA can adapt), from its config on the meta device."""
    import torch  # heavy imports only after the params file has passed the schema
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def check_target_modules(target: str | list[str], names: list[str]) -> None:
    """`lora.target_modules` as PEFT reads it: a list entry matches a module whose name is it or ends in
    `.<entry>`; a string is `all-linear` or a regex matched against whole names. Every entry must match a
    linear layer (PEFT fails only when none does, and without naming the key)."""
    if target == ALL_LINEAR:
        return
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    if isinstance(target, str):
        if not any(re.fullmatch(target, name) for name in names):
            raise ValueError(
                f"params.yaml: `lora.target_modules`: regex {target!r} matches no linear layer of the base model; "
                f"use {ALL_LINEAR} or a list of: {', '.join(leaves)}"
            )
        return
    unknown = [t for t in target if not any(name == t or name.endswith(f".{t}") for name in names)]
    if unknown:
        raise ValueError(
            f"params.yaml: `lora.target_modules`: {', '.join(unknown)} not in the base model; valid names: "
            f"{', '.join(leaves)} (or {ALL_LINEAR})"
        )


@click.command()
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_dir", default="data/models/base", type=click.Path(file_okay=False))
@click.option("--out", default="data/model.valid", type=click.Path(dir_okay=False))
def main(params_path: str, model_dir: str, out: str) -> None:
    params = load_valid(params_path)[1]
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise click.ClickException(f"{config_path} does not exist; run the base stage first (dvc repro base)")
    try:
        check_layers(params, json.loads(config_path.read_text()))
        check_target_modules(params.lora.target_modules, linear_names(Path(model_dir)))
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    from arca.io import write_text

    write_text(Path(out), VALID)
    click.echo(f"{params_path}: fits {model_dir}")


if __name__ == "__main__":
    main()
