"""Stage `faithfulness@<run>`: counterfactual token effects on one run's probe completions and how well every
signal's weights point at the decisive tokens (SPEC 9).

    python -m stages.faithfulness --run arca-r8-s0 [--params params.yaml]

Reads the run's dump (data/dumps/<run>.parquet: the probe completions and every signal's weights on them), the
probe prompts (data/prepared/probe.parquet) and the run's adapter snapshots. At each checkpoint of
`faithfulness.steps` (`final`: the dump's last step; or a list of steps the dump holds) it decodes, per scored
position, a control and an intervention greedily from that checkpoint (`arca.sampling.counterfactual`), grades
both with `train.grader`, and scores every signal and its permutation control (`arca.analysis.faithfulness`).

Writes data/faithfulness/<run>/effects.parquet (one row per scored position: run, step, prompt_id, sample, pos,
token_id, alt_token_id, r0, r1, effect, decisive, and the lengths of both decodes) and scores.parquet (one row
per signal x step: auc, lift, top_hit with 95% bootstrap intervals, decisive share, completions counted).
Cost: 2 greedy decodes per scored position, `faithfulness.max_positions` positions per completion.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click
import pandas as pd

from stages.common import load_valid, section

log = logging.getLogger("stages.faithfulness")
OUT = Path("data/faithfulness")


def faithfulness_params(params: dict) -> dict:
    """The `faithfulness` section, checked (errors name the key). `faithfulness.runs` is not read: dvc.yaml makes
    one cell per listed run and passes its id (`--run`), so adding a run reruns no other cell; the validate stage
    checks that every listed id is a run of study.runs."""
    cfg = section(params, "faithfulness")
    for key in ("max_positions", "batch_size"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise ValueError(f"params.yaml: faithfulness.{key} must be a positive int, got {cfg.get(key)!r}")
    if isinstance(cfg.get("seed"), bool) or not isinstance(cfg.get("seed"), int):
        raise ValueError(f"params.yaml: faithfulness.seed must be an int, got {cfg.get('seed')!r}")
    steps = cfg.get("steps")
    if steps != "final" and not (isinstance(steps, list) and steps and all(type(s) is int and s >= 0 for s in steps)):
        raise ValueError(f"params.yaml: faithfulness.steps must be `final` or a list of steps >= 0, got {steps!r}")
    return cfg


def chosen_steps(steps: str | list[int], available: list[int], run: str) -> list[int]:
    """`final` -> the dump's last step; a list -> those steps, each of which the dump must hold."""
    if steps == "final":
        return [max(available)]
    missing = sorted(set(steps) - set(available))
    if missing:
        raise ValueError(f"params.yaml: faithfulness.steps {missing} are not checkpoints of {run}; have {available}")
    return sorted(set(steps))


def effects_at(run: str, step: int, dump: pd.DataFrame, model, tokenizer, params: dict) -> pd.DataFrame:
    """The effects table of one checkpoint (rows sorted by prompt_id, sample, pos)."""
    from arca.sampling.counterfactual import effects_frame, probes_from_dump, token_effects
    from arca.sampling.rollouts import eos_token_ids
    from arca.tasks.grading import GRADERS

    cfg, train = section(params, "faithfulness"), section(params, "train")
    probe = pd.read_parquet("data/prepared/probe.parquet")
    keys, probes = probes_from_dump(
        tokenizer,
        dump,
        dict(zip(probe["prompt_id"], probe["prompt"])),
        dict(zip(probe["prompt_id"], probe["answer"])),
        max_positions=cfg["max_positions"],
        seed=cfg["seed"],
        chat_template_kwargs=section(params, "model").get("chat_template_kwargs"),
    )
    rows = token_effects(
        model,
        tokenizer,
        probes,
        GRADERS[train.get("grader", "math_verify")],
        max_completion_length=train["max_completion_length"],
        eos_ids=eos_token_ids(model.generation_config, tokenizer),
        batch_size=cfg["batch_size"],
        progress=f"faithfulness {run} step {step}",
    )
    return effects_frame(keys, rows, run, step)


@click.command()
@click.option("--run", "run", required=True, help="a run id of faithfulness.runs (dvc.yaml passes it)")
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
def main(run: str, params_path: str) -> None:
    params = load_valid(params_path)[0]  # the whole file first: ~1 s, before torch loads
    try:  # a params error is one line and a non-zero exit, never a traceback
        cfg = faithfulness_params(params)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    import pyarrow.parquet as pq  # heavy imports (torch, transformers) only after validation

    from arca.analysis.faithfulness import completion_scores, summarize
    from arca.io import write_parquet
    from stages.runs import load_base_model, params_hash, snapshots, with_adapter

    dump_path = Path("data/dumps") / f"{run}.parquet"
    if not dump_path.is_file():
        raise click.ClickException(f"{dump_path}: no dump for run {run}; run `dvc repro dump@{run}` first")
    dump = pd.read_parquet(dump_path)
    try:  # a params error is one line and a non-zero exit, never a traceback
        steps = chosen_steps(cfg["steps"], sorted(int(s) for s in dump["step"].unique()), run)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    signals = [c[2:] for c in dump.columns if c.startswith("w_")]
    adapters = snapshots(Path("data/runs") / run)
    base, tokenizer = load_base_model(section(params, "model").get("dtype", "auto"))
    effects, scores = [], []
    for step in steps:
        at_step = dump[dump["step"] == step]
        model = with_adapter(base, adapters[step])
        start = time.monotonic()
        effects.append(effects_at(run, step, at_step, model, tokenizer, params))
        log.info(
            "%s step %d: %d positions, %d decisive, %.1f s of decodes",
            run,
            step,
            len(effects[-1]),
            int(effects[-1]["decisive"].sum()),
            time.monotonic() - start,
        )
        per_completion = completion_scores(at_step, effects[-1], signals, seed=cfg["seed"])
        scores.append(per_completion.assign(run=run, step=step))
        base = model.unload()
    summary = summarize(pd.concat(scores, ignore_index=True), seed=cfg["seed"])
    train, model_params = section(params, "train"), section(params, "model")
    metadata = {
        "arca.run": run,
        "arca.dump_params_md5": pq.read_schema(dump_path).metadata.get(b"arca.params_md5", b"").decode(),
        "arca.params_md5": params_hash(
            {k: model_params.get(k) for k in ("dtype", "chat_template_kwargs")},
            {k: train.get(k) for k in ("max_completion_length", "grader")},
            {k: cfg.get(k) for k in ("steps", "max_positions", "batch_size", "seed")},
        ),
    }
    write_parquet(OUT / run / "effects.parquet", pd.concat(effects, ignore_index=True), metadata=metadata)
    write_parquet(OUT / run / "scores.parquet", summary, metadata=metadata)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
