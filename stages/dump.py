"""Stage `dump@<run>`: per-token credit weights of every signal on fixed probe rollouts, at every saved
checkpoint of one run (step 0 included), as one Parquet file (SPEC section 6).

    python -m stages.dump --method arca --rank 8 --seed 0 [--params params.yaml]
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
import pandas as pd
import torch

from arca.dump import dump_schema, signal_weights, token_table
from arca.grading import math_reward
from arca.io import read_json, write_parquet
from arca.rollouts import generate
from arca.signals import SIGNAL_NAMES
from stages.common import credit_config, load_params, section
from stages.runs import load_base_model, params_hash, run_id, snapshots, with_adapter

log = logging.getLogger("stages.dump")


def dump_run(run: str, meta: dict, params: dict) -> pd.DataFrame:
    dump, credit = section(params, "dump"), credit_config(params, meta["method"])
    train = section(params, "train")
    model_params = section(params, "model")
    probe = pd.read_parquet("data/prepared/probe.parquet")
    base, tokenizer = load_base_model(model_params.get("dtype", "auto"))
    tables = []
    for step, adapter_dir in snapshots(Path("data/runs") / run).items():
        model = with_adapter(base, adapter_dir)
        rollouts = generate(
            model,
            tokenizer,
            list(probe["prompt"]),
            samples=dump["samples"],
            greedy=False,
            max_new_tokens=train["max_completion_length"],
            temperature=train.get("temperature", 1.0),
            seed=dump.get("seed", 0),
            batch_size=dump.get("batch_size", 16),
            chat_template_kwargs=model_params.get("chat_template_kwargs"),
        )
        answers = list(probe["answer"])
        rewards = torch.tensor(
            [math_reward(t, answers[i]) for i, t in zip(rollouts.prompt_index.tolist(), rollouts.texts)]
        )
        weights = signal_weights(
            model, rollouts, credit, SIGNAL_NAMES, dump.get("batch_size", 16), train.get("temperature", 1.0)
        )
        tables.append(
            token_table(rollouts, tokenizer, list(probe["prompt_id"]), rewards, weights, {**meta, "step": step})
        )
        log.info("%s step %d: reward %.2f, %d tokens", run, step, rewards.mean(), len(tables[-1]))
        base = model.unload()
    return pd.concat(tables, ignore_index=True)


@click.command()
@click.option("--method", required=True)
@click.option("--rank", required=True, type=int)
@click.option("--seed", required=True, type=int)
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
def main(method: str, rank: int, seed: int, params_path: str) -> None:
    params = load_params(params_path)
    for key in ("samples",):
        value = section(params, "dump").get(key)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"params.yaml: dump.{key} must be a positive int, got {value!r}")
    credit_config(params, method)  # bad credit params fail here, before any model loads
    run = run_id(method, rank, seed)
    budget = read_json(Path("data/runs") / run / "budget.json")
    meta = {"run": run, "method": budget["method"], "rank": budget["rank"], "seed": budget["seed"]}
    df = dump_run(run, meta, params)
    phash = params_hash(
        params.get("model"), params.get("train"), params.get("lora"), params.get("credit"), params.get("dump")
    )
    write_parquet(
        Path("data/dumps") / f"{run}.parquet",
        df,
        schema=dump_schema(),
        metadata={"arca.schema": str(dump_schema()), "arca.params_md5": phash, "arca.run": run},
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
