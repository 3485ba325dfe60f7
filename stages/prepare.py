"""Stage `prepare`: MATH (and the easy arithmetic training source) into chat-formatted Parquet tables.

    python -m stages.prepare [--params params.yaml] [--out data/prepared]

Writes train.parquet, eval.parquet (column `eval_set`), probe.parquet (the fixed prompts the dumps use)
and metrics/prepare.json (row counts, including rows dropped for lack of a boxed reference answer).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
import pandas as pd

from arca.arithmetic import arithmetic_problems
from arca.data import build_prompt, filter_problems, load_embedded, load_hub, load_math_path, normalize_table
from arca.io import write_json, write_parquet
from stages.common import load_params, section

SOURCES = ("embedded", "path", "hub")
TRAIN_SOURCES = ("arithmetic", "math")


def check_params(data: dict) -> None:
    """Fail before loading anything, naming the params.yaml key."""
    if data.get("source") not in SOURCES:
        raise ValueError(f"params.yaml: data.source must be one of {SOURCES}, got {data.get('source')!r}")
    if data["source"] == "path" and not data.get("path"):
        raise ValueError("params.yaml: data.path is required when data.source is 'path'")
    if data["source"] == "hub" and not data.get("hub_name"):
        raise ValueError("params.yaml: data.hub_name is required when data.source is 'hub'")
    train = section(data, "train")
    if train.get("source") not in TRAIN_SOURCES:
        raise ValueError(f"params.yaml: data.train.source must be one of {TRAIN_SOURCES}, got {train.get('source')!r}")
    for key, block in [("data.train", train), *[(f"data.eval.{k}", v) for k, v in section(data, "eval").items()]]:
        n = block.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"params.yaml: {key}.n must be a positive int, got {n!r}")
        for name in ("levels", "subjects"):
            if block.get(name) is not None and not block.get(name):
                raise ValueError(f"params.yaml: {key}.{name} is empty; use null for no filter")
    probe_n = section(data, "probe").get("n")
    if not isinstance(probe_n, int) or probe_n <= 0:
        raise ValueError(f"params.yaml: data.probe.n must be a positive int, got {probe_n!r}")


def load_math(data: dict, split: str) -> pd.DataFrame:
    """The raw MATH split from the configured source (`test` from the embedded wheel means MATH-500)."""
    if data["source"] == "embedded":
        return load_embedded("math500" if split == "test" else "math", split)
    if data["source"] == "path":
        return load_math_path(Path(data["path"]), split)
    return load_hub(data["hub_name"], split, data.get("hub_config"))


def select(df: pd.DataFrame, block: dict, exclude: set[str]) -> pd.DataFrame:
    df = df[~df["problem"].isin(exclude)]
    return filter_problems(
        df,
        subjects=block.get("subjects"),
        levels=block.get("levels"),
        max_answer_chars=block.get("max_answer_chars"),
        n=block["n"],
        seed=block.get("seed", 0),
    )


def with_prompts(df: pd.DataFrame, prompt: dict) -> pd.DataFrame:
    shots = [(s["problem"], s["answer"]) for s in prompt.get("few_shot") or []]
    df = df.copy()
    df["prompt"] = [build_prompt(p, shots, prompt.get("system")) for p in df["problem"]]
    return df.reset_index(drop=True)


def build_tables(data: dict, prompt: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(train, eval, counts); few-shot problems are excluded from both so no answer leaks."""
    exclude = {s["problem"] for s in prompt.get("few_shot") or []}
    train_block, eval_blocks = data["train"], data["eval"]
    counts: dict[str, dict] = {}
    arith_needed = train_block["source"] == "arithmetic" or "arithmetic" in eval_blocks
    pool = pd.DataFrame()
    if arith_needed:
        n_arith = (train_block["n"] if train_block["source"] == "arithmetic" else 0) + eval_blocks.get(
            "arithmetic", {}
        ).get("n", 0)
        pool = arithmetic_problems(n_arith + len(exclude), seed=train_block.get("seed", 0))
        pool = pool[~pool["problem"].isin(exclude)].head(n_arith)
    if train_block["source"] == "arithmetic":
        train = pool.head(train_block["n"])
        pool = pool.iloc[train_block["n"] :]
    else:
        train, counts["math_train"] = normalize_table(load_math(data, "train"))
        train = select(train, train_block, exclude)
    evals = []
    for name, block in sorted(eval_blocks.items()):
        if name == "arithmetic":
            part = pool.head(block["n"]).assign(split="test")
        else:
            part, counts[f"{name}_test"] = normalize_table(load_math(data, "test"))
            part = select(part, block, exclude)
        evals.append(part.assign(eval_set=name))
    eval_df = pd.concat(evals, ignore_index=True)
    counts["rows"] = {"train": len(train), **{k: int(v) for k, v in eval_df["eval_set"].value_counts().items()}}
    return with_prompts(train, prompt), with_prompts(eval_df, prompt), counts


@click.command()
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default="data/prepared", type=click.Path(file_okay=False))
@click.option("--metrics", default="metrics/prepare.json", type=click.Path(dir_okay=False))
def main(params_path: str, out: str, metrics: str) -> None:
    params = load_params(params_path)
    data, prompt = section(params, "data"), section(params, "prompt")
    check_params(data)
    train, eval_df, counts = build_tables(data, prompt)
    probe = train.sample(n=min(data["probe"]["n"], len(train)), random_state=data["probe"].get("seed", 0))
    probe = probe.sort_values("prompt_id").reset_index(drop=True)
    out_dir = Path(out)
    write_parquet(out_dir / "train.parquet", train)
    write_parquet(out_dir / "eval.parquet", eval_df)
    write_parquet(out_dir / "probe.parquet", probe)
    write_json(metrics, counts)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
