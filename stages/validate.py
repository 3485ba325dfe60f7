"""Stage `validate`, the first of the pipeline: the whole params.yaml against `stages.schema`, plus the checks
that need the installed packages (the embedded model's wheel, vLLM), the machine (`train.device: cuda`) or the
data source (the prompt tables `prepare` would build: a few-shot answer without `\\boxed{}`, an `n` larger than
the source), before `base`, `prepare` or any train cell runs and so before DVC deletes any of their outputs.

    python -m stages.validate [--params params.yaml] [--out data/params.valid]

dvc.yaml gives this stage every params key, so any edit (a typo in a key no other stage declares included)
reruns it, in a second or two; `base`, `prepare` and every train cell depend on its output, whose bytes never
change, so a passing check reruns nothing downstream and a failing one stops `dvc repro` first. The checks that
need the base model (ARCA's layer, `lora.target_modules`) run right after `base`, in `stages.check_model`.
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import check_engine, check_model_source, load_valid

VALID = "params.yaml satisfies stages/schema.py\n"  # constant: downstream stages must not rerun on a passing check


def check_data(raw: dict) -> None:
    """The prompt tables `prepare` would build, built and dropped: the checks that need the data (`n` against the
    source; the rest is the schema's) fail here, before DVC deletes `prepare`'s committed outputs. A hub source
    is not downloaded here (this stage stays offline): its `n` is checked by `prepare`."""
    from stages.prepare import build_tables

    if raw["data"]["source"] != "hub":
        build_tables(raw["data"], raw["prompt"])


def check_device(params) -> None:
    """`train.device: cuda` without a usable CUDA device fails here, before any train cell (and before torch
    loads when the device is not cuda)."""
    if params.train.device != "cuda":
        return
    from arca.run.settings import SettingError, resolve_device

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
@click.option("--out", default="data/params.valid", type=click.Path(dir_okay=False))
def main(params_path: str, out: str) -> None:
    raw, params = load_valid(params_path)
    try:
        check_device(params)
        check_model_source(params.model)
        check_engines(raw)
        check_data(raw)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
    from arca.io import write_text

    write_text(Path(out), VALID)
    click.echo(f"{params_path}: valid ({len(params.study.runs)} runs)")


if __name__ == "__main__":
    main()
