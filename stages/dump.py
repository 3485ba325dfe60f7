"""Stage `dump@<run>`: per-token credit weights of every signal on fixed probe rollouts, at every saved
checkpoint of one run (step 0 included), as one Parquet file (SPEC section 6).

    python -m stages.dump --run arca-r8-s0 [--params params.yaml]     # or --method arca --rank 8 --seed 0

A permuted run (`arca_perm-r8-s0`, SPEC 3) is dumped like its signal's run: the same credit params, weights
at the signal's own positions; its `method` column says `arca_perm` (the method the run was trained with).

When `model.dtype` resolves to a dtype other than float32 (bf16 on a GPU), every precision-sensitive signal
is recomputed in float32 on the same rollouts and checkpoint and written as `a32_<signal>` (SPEC 2b); the
file's metadata records the dtype (`arca.dtype`) and those signals (`arca.a32_signals`).

`dump.engine` samples the rollouts: `hf` (`model.generate`) or `vllm` (arca.sampling.vllm, the snapshot served
as a vLLM LoRA); the signals come from the HF model on those tokens either way (`arca.engine` in the metadata).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
import pandas as pd

from stages.common import check_engine, load_valid, parse_run_id, run_id, section
from stages.credit_params import credit_config

log = logging.getLogger("stages.dump")


def dump_run(run: str, meta: dict, params: dict, checked: list[str], engine: str = "hf") -> pd.DataFrame:
    """Every checkpoint's token table; `checked` lists the signals that also get `a32_` columns. `engine` samples
    the rollouts (`hf` or `vllm`); the signals are computed by the HF model on the sampled tokens either way."""
    import torch

    from arca.credit.signals import SIGNAL_NAMES
    from arca.sampling.dump import float32_saliences, signal_weights, token_table
    from arca.sampling.rollouts import generate
    from arca.tasks.grading import GRADERS
    from stages.runs import load_base_model, snapshots, vllm_sampler, with_adapter

    dump, credit = section(params, "dump"), credit_config(params, meta["method"])  # `arca_perm`: ARCA's params
    train = section(params, "train")
    model_params = section(params, "model")
    probe = pd.read_parquet("data/prepared/probe.parquet")
    dtype = model_params.get("dtype", "auto")
    base, tokenizer = load_base_model(dtype)
    batch_size, temperature = dump.get("batch_size", 16), train.get("temperature", 1.0)
    sampler = vllm_sampler(dtype, meta["rank"], dump.get("seed", 0)) if engine == "vllm" else None
    prompts, answers, prompt_ids = list(probe["prompt"]), list(probe["answer"]), list(probe["prompt_id"])
    sampling = {
        "samples": dump["samples"],
        "greedy": False,
        "max_new_tokens": train["max_completion_length"],
        "temperature": temperature,
        # The run's own sampling filter: probes measured on another distribution than the one trained on
        # would inflate the tail tokens' surprisal (top-p 0.95 in the GPU profiles).
        "top_p": 1.0 if train.get("top_p") is None else train["top_p"],
        "top_k": 0 if train.get("top_k") is None else train["top_k"],
        "seed": dump.get("seed", 0),
        "batch_size": batch_size,
        "chat_template_kwargs": model_params.get("chat_template_kwargs"),
    }
    grade = GRADERS[train.get("grader", "math_verify")]  # rewards and advantages as the run's training saw them
    tables = []
    for step, adapter_dir in snapshots(Path("data/runs") / run).items():
        model = with_adapter(base, adapter_dir)
        label = f"dump {run} step {step}"
        if sampler is None:
            rollouts = generate(model, tokenizer, prompts, **sampling, progress=f"{label}: sampling")
        else:
            rollouts = sampler.generate(tokenizer, prompts, adapter_dir=adapter_dir, **sampling)
        rewards = torch.tensor([grade(t, answers[i]) for i, t in zip(rollouts.prompt_index.tolist(), rollouts.texts)])
        weights = signal_weights(model, rollouts, credit, SIGNAL_NAMES, batch_size, temperature, f"{label}: signals")
        # The float32 truth of the same tokens: no new rollouts, the checkpoint's weights upcast in place.
        a32 = float32_saliences(model, rollouts, checked, credit.layer, batch_size, temperature, f"{label}: float32")
        tables.append(token_table(rollouts, tokenizer, prompt_ids, rewards, weights, {**meta, "step": step}, a32))
        log.info("%s step %d: reward %.2f, %d tokens", run, step, rewards.mean(), len(tables[-1]))
        base = model.unload()
    return pd.concat(tables, ignore_index=True)


@click.command()
@click.option("--run", "run", default=None, help="run id, a key of study.runs (or give --method, --rank, --seed)")
@click.option("--method", default=None, help="the run's method label (arca, arca_perm, ...)")
@click.option("--rank", default=None, type=int)
@click.option("--seed", default=None, type=int)
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
def main(run: str | None, method: str | None, rank: int | None, seed: int | None, params_path: str) -> None:
    params = load_valid(params_path)[0]  # the whole file first: ~1 s, before torch loads
    if run is None and None in (method, rank, seed):
        raise click.UsageError("give --run <run id>, or --method, --rank and --seed")
    run = run or run_id(method, rank, seed)
    try:  # a params error is one line and a non-zero exit, never a traceback
        credit_config(params, parse_run_id(run)[0])  # bad credit params fail here, before any model loads
        engine = check_engine(params, "dump")
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    from arca.credit.signals import SIGNAL_NAMES  # heavy imports (torch, transformers) only after validation
    from arca.io import read_json, write_parquet
    from arca.models.base import resolve_dtype
    from arca.sampling.dump import a32_signals, dump_schema
    from stages.runs import params_hash

    budget = read_json(Path("data/runs") / run / "budget.json")
    meta = {"run": run, "method": budget["method"], "rank": budget["rank"], "seed": budget["seed"]}
    dtype = resolve_dtype(section(params, "model").get("dtype", "auto"))
    checked = a32_signals(dtype, SIGNAL_NAMES)
    df = dump_run(run, meta, params, checked, engine)
    # Exactly what this stage reads (its dvc.yaml params) plus the run's own settings hash from budget.json.
    model, train = section(params, "model"), section(params, "train")
    phash = params_hash(
        budget.get("params_md5"),
        {k: model.get(k) for k in ("dtype", "chat_template_kwargs")},
        {k: train.get(k) for k in ("max_completion_length", "temperature", "top_p", "top_k", "grader")},
        params.get("credit"),
        params.get("dump"),
    )
    schema = dump_schema(SIGNAL_NAMES, checked)
    metadata = {
        "arca.schema": str(schema),
        "arca.params_md5": phash,
        "arca.run_params_md5": str(budget.get("params_md5", "")),
        "arca.run": run,
        "arca.dtype": str(dtype).removeprefix("torch."),
        "arca.a32_signals": ",".join(checked),
        "arca.engine": engine,
    }
    write_parquet(Path("data/dumps") / f"{run}.parquet", df, schema=schema, metadata=metadata)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
