"""Stage `validate`: the whole params.yaml against `stages.schema`, plus the checks that need the base model
(ARCA's layer index), the installed packages (vLLM) or the machine (`train.device: cuda`), before any train
cell runs.

    python -m stages.validate [--params params.yaml] [--model data/models/base] [--out data/params.valid]

dvc.yaml gives this stage every params key, so any edit (a typo in a key no other stage declares included)
reruns it, in about a second; `prepare` and every train cell depend on its output, whose bytes never change,
so a passing check reruns nothing downstream and a failing one stops `dvc repro` first.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from arca.io import write_text
from stages.common import check_engine, check_layer, load_params
from stages.schema import validate
from stages.strict import ParamsError

VALID = "params.yaml satisfies stages/schema.py\n"  # constant: downstream stages must not rerun on a passing check


def check_model(params, model_dir: Path) -> None:
    """The checks that read the base model's config: every ARCA layer index exists in it."""
    config = json.loads((model_dir / "config.json").read_text())
    layers = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
    check_layer(params.credit.layer, layers, "credit.layer")
    for method, block in params.credit.methods.items():
        if block.layer is not None:
            check_layer(block.layer, layers, f"credit.methods.{method}.layer")


def check_device(params) -> None:
    """`train.device: cuda` without a usable CUDA device fails here, before any train cell (and before torch
    loads when the device is not cuda)."""
    if params.train.device != "cuda":
        return
    from arca.train_settings import SettingError, resolve_device

    try:
        resolve_device(params.train.device)
    except SettingError as err:
        raise ValueError(f"params.yaml: train.device {err.detail}") from None


def check_engines(raw: dict) -> None:
    """An engine that is not installed fails here, not after the train cells have run."""
    for section in ("dump", "evaluate"):
        check_engine(raw, section)


@click.command()
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_dir", default="data/models/base", type=click.Path(file_okay=False))
@click.option("--out", default="data/params.valid", type=click.Path(dir_okay=False))
def main(params_path: str, model_dir: str, out: str) -> None:
    try:
        raw = load_params(params_path)
        params = validate(raw, params_path)
        check_device(params)
        check_model(params, Path(model_dir))
        check_engines(raw)
    except (ParamsError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    write_text(Path(out), VALID)
    click.echo(f"{params_path}: valid ({len(params.study.runs)} runs)")


if __name__ == "__main__":
    main()
