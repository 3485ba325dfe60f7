"""Train one LoRA-GRPO run with one credit method; resumes from the run's last checkpoint if there is one.

    python -m stages.train --run arca-r8-s0 [--params params.yaml] [--out data/runs/arca-r8-s0]
        [--checkpoints data/checkpoints/arca-r8-s0]
    python -m stages.train --method arca --rank 8 --seed 0 ...      # the same run, named by its parts

`--run` is a key of `study.runs` (what dvc.yaml passes): `<method>[_perm]-r<rank>-s<seed>`, where `_perm` marks
the permutation control (SPEC 3: the run's cell has `permute: true`, which the params schema ties to the id), so
a change of `permute` is a change of the run id, i.e. another train cell.

TRL checkpoints go to `--checkpoints`, outside the run's DVC outputs: untracked (never pushed, never a dep of
`tables`/`figures`), and kept across reruns, so a killed or preempted run resumes from them.

Reads params.yaml `model.{dtype, chat_template_kwargs}`, `lora` (`alpha`, or `alpha_per_rank`: alpha = ratio x
rank), `train` and `credit.methods.<method>` (only the credit fields the method uses), the base model in
data/models/base and the prompts in data/prepared/train.parquet; writes the run directory described in
`arca.run.training`. Every param is validated before the model loads.

`ARCA_REPORT_TO` (environment, comma-separated TRL `report_to` values, e.g. `tensorboard`; default none) sends the
training log, `credit/*` metrics included, to trackers while the run trains; file-based ones write under
`logs/<run id>/` (`logs/<run>/tensorboard`), outside every DVC output. It is no param: setting it retrains nothing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from arca.methods import METHOD_FIELDS, split_run_method
from stages.common import check_layer, load_valid, parse_run_id, run_id
from stages.credit_params import method_credit_config
from stages.schema import Params, validate

MODEL_DIR = Path("data/models/base")
TRAIN_PATH = Path("data/prepared/train.parquet")
# `train:` keys that are no `TrainSettings` field: `num_processes` (checked against the launched WORLD_SIZE) and
# `launcher` (the command dvc.yaml starts the stage with; DVC reads it, the stage does not). Every other `train:`
# key is the `TrainSettings` field of the same name.
LAUNCH_KEYS = ("num_processes", "launcher")
# TrainSettings fields named otherwise in params.yaml or on the command line (the rest are `train.<field>`).
SETTING_SOURCES = {
    "rank": "--rank",
    "seed": "--seed",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.target_modules",
    "dtype": "model.dtype",
    "chat_template_kwargs": "model.chat_template_kwargs",
}


def settings_from_params(
    params: Params | dict[str, Any],
    method: str,
    rank: int,
    seed: int,
    out: Path,
    checkpoints: Path | None = None,
    permute: bool = False,
):
    """(`TrainSettings`, `CreditConfig`) of one run from the schema's typed params (a plain dict is validated
    first); no model or data is touched. `permute` is the run's own option (its `study.runs` cell), not a credit
    key. The values come as the schema typed them: no second parse."""
    from arca.run.settings import SettingError, TrainSettings

    params = params if isinstance(params, Params) else validate(params)
    credit = method_credit_config(params, method)
    if permute:
        credit = replace(credit, permute=True)
    lora, model = params.lora, params.model
    fields: dict[str, Any] = params.train.model_dump(exclude=set(LAUNCH_KEYS))
    modules = lora.target_modules
    try:
        settings = TrainSettings(
            model_dir=MODEL_DIR,
            train_path=TRAIN_PATH,
            output_dir=out,
            checkpoint_dir=checkpoints,
            seed=seed,
            rank=rank,
            # `lora.alpha_per_rank` x rank: one alpha / rank ratio over several ranks (the paper: alpha = 2r).
            lora_alpha=lora.alpha if lora.alpha is not None else lora.alpha_per_rank * rank,
            lora_dropout=lora.dropout,
            target_modules=modules if isinstance(modules, str) else tuple(modules),
            dtype=model.dtype,
            chat_template_kwargs=dict(model.chat_template_kwargs),
            **fields,
        )
    except SettingError as err:  # the library names its field; here the user needs the params key
        source = SETTING_SOURCES.get(err.field, f"train.{err.field}")
        prefix = "" if source.startswith("--") else "params.yaml: "
        raise ValueError(f"{prefix}{source} {err.detail}") from None
    return settings, credit


def check_device(device: str) -> None:
    """`train.device: cuda` needs a usable CUDA device: checked before any model loads, in one line naming the
    key, the torch build and the fix (a GPU profile must never fall back to a days-long CPU run)."""
    from arca.run.settings import SettingError, resolve_device

    try:
        resolve_device(device)
    except SettingError as err:
        raise ValueError(f"params.yaml: train.device {err.detail}") from None


def check_world_size(params: Params) -> None:
    """`train.num_processes` must be what the launcher started: dvc.yaml runs `${train.launcher} -m stages.train`,
    so a multi-process run is `accelerate launch --num_processes N ...` there, never a re-exec from inside this
    stage (a re-exec that `accelerate launch` answered with a single process recursed without end)."""
    n = params.train.num_processes
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != n:
        raise click.ClickException(
            f"params.yaml: train.num_processes is {n} but this stage runs in {world} process(es); set "
            f"train.launcher to `accelerate launch --num_processes {n}` (or num_processes to {world})"
        )


def resolve_run(
    run: str | None, method: str | None, rank: int | None, seed: int | None
) -> tuple[str, str, int, int, bool]:
    """`(run id, method, rank, seed, permute)` from `--run` or from `--method/--rank/--seed` (the parts, if given
    next to `--run`, must agree with it)."""
    if run is None:
        if method is None or rank is None:
            raise click.UsageError("give --run <run id>, or --method and --rank (and --seed)")
        seed = 0 if seed is None else seed
        return run_id(method, rank, seed), method, rank, seed, False
    try:
        label, *parts = parse_run_id(run)
        signal, permute = split_run_method(label)
    except ValueError as err:
        raise click.UsageError(f"--run: {err}") from None
    for name, given, parsed in zip(("method", "rank", "seed"), (method, rank, seed), (signal, *parts)):
        if given is not None and given != parsed:
            raise click.UsageError(f"--{name} {given} disagrees with --run {run} ({parsed}); give one of them")
    return run, signal, parts[0], parts[1], permute


TRACKER_LOGS = Path("logs")  # $ARCA_REPORT_TO's file-based trackers: logs/<run>/, ignored by git and DVC


@click.command()
@click.option("--run", "run", default=None, help="run id, a key of study.runs (e.g. arca_perm-r8-s0)")
@click.option("--method", default=None, help="credit method, one of arca.credit.config.METHODS")
@click.option("--rank", default=None, type=int, help="LoRA rank")
@click.option("--seed", default=None, type=int, help="default 0")
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="default data/runs/<run id>")
@click.option(
    "--checkpoints",
    default=None,
    type=click.Path(file_okay=False),
    help="TRL checkpoints; default data/checkpoints/<run id>",
)
def main(
    run: str | None,
    method: str | None,
    rank: int | None,
    seed: int | None,
    params_path: str,
    out: str | None,
    checkpoints: str | None,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _, params = load_valid(params_path)  # the whole file against the schema first, before anything is touched
    check_world_size(params)
    run, method, rank, seed, permute = resolve_run(run, method, rank, seed)
    out_dir = Path(out) if out else Path("data/runs") / run
    checkpoint_dir = Path(checkpoints) if checkpoints else Path("data/checkpoints") / run
    try:
        settings, credit = settings_from_params(params, method, rank, seed, out_dir, checkpoint_dir, permute)
        check_device(settings.device)
        for path, what in ((MODEL_DIR, "base model directory"), (TRAIN_PATH, "train parquet")):
            if not path.exists():
                raise ValueError(f"{what} {path} does not exist; run the stage that writes it first (dvc repro)")
        if "layer" in METHOD_FIELDS[method]:  # before the model loads: the index must exist in it
            config = json.loads((MODEL_DIR / "config.json").read_text())
            check_layer(credit.layer, config["num_hidden_layers"], f"credit.methods.{method}.layer")
    except (ValueError, TypeError, OSError) as err:
        raise click.ClickException(str(err)) from None
    from arca.run.training import run_training  # heavy imports (torch, TRL) only after validation

    metrics = run_training(settings, credit, tracker_dir=TRACKER_LOGS / run)
    click.echo(f"{out_dir}: {metrics.get('steps')} steps, tail reward {metrics.get('reward_tail')}")


if __name__ == "__main__":
    main()
