"""Stage `prepare`: MATH and the synthetic sources (one-digit additions, multi-step `reasoning`) into prompt
tables (chat messages or raw text).

    python -m stages.prepare [--params params.yaml] [--out data/prepared]

Writes train.parquet, eval.parquet (column `eval_set`), probe.parquet (the fixed prompts the dumps use)
and metrics/prepare.json (row counts, including rows dropped for lack of a boxed reference answer).

Params (all validated before any data loads; errors name the key and the fix):
- `data.train.source`: `math`, or a synthetic source (`SYNTHETIC`: `arithmetic`, `reasoning`), whose eval set
  `data.eval.<source>: {n}` is drawn in the same seeded draw after the training problems, so it is held out.
- `data.train.n`: problems to train on; null = every usable problem (MATH only).
- `data.eval.<set>.split` (MATH sets): `math500` (the 500-problem subset) or `test` (the full 5,000-problem
  test split). Absent: `math500` for `data.source: embedded`, the source's `test` split for `path` and `hub`.
- `data.eval.<set>.select` (MATH sets; `data.train.select` too): `sample` (seeded sample, the default) or `first`
  (the first n rows in the source's order, see `arca.tasks.sources`); `n: null` takes the whole split.
- `prompt.format`: `chat` (default: `system` + `few_shot` as chat messages, rendered by the tokenizer's chat
  template at generation) or `raw` (`prompt.template` with `{problem}` replaced, plain text, no chat template).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
import pandas as pd

from arca.io import write_json, write_parquet
from arca.tasks.arithmetic import arithmetic_problems
from arca.tasks.prompts import build_prompt, raw_prompt
from arca.tasks.reasoning import reasoning_problems
from arca.tasks.sources import filter_problems, load_embedded, load_hub, load_math_path, normalize_table
from stages.common import load_valid, section

# Seeded generated sources: name -> f(n, seed=...) -> problem table; each name is also an eval set (`data.eval.<name>`).
SYNTHETIC = {"arithmetic": arithmetic_problems, "reasoning": reasoning_problems}
TRAIN_SOURCES = ("arithmetic", "math", "reasoning")
_FILTERS = ("levels", "subjects", "max_answer_chars")


def eval_split(data: dict, block: dict) -> str:
    """The MATH split a `data.eval.<set>` block reads: its `split`, else the source's default (module docstring)."""
    return block.get("split") or ("math500" if data.get("source") == "embedded" else "test")


def load_math(data: dict, split: str, eval_split_name: str | None = None) -> pd.DataFrame:
    """The raw MATH split from the configured source; for `test`, `eval_split_name` picks MATH-500 or the full
    split where the source has both (`embedded`); `path` and `hub` give their own test split."""
    if data["source"] == "embedded":
        if split == "train":
            return load_embedded("math", "train")
        return load_embedded("math500" if (eval_split_name or "math500") == "math500" else "math", "test")
    if data["source"] == "path":
        return load_math_path(Path(data["path"]), split)
    return load_hub(data["hub_name"], split, data.get("hub_config"))


def select(df: pd.DataFrame, block: dict, exclude: set[str], key: str = "data.train", what: str = "") -> pd.DataFrame:
    """`block`'s filters and its n problems of `df` (minus `exclude`); too large an n names the key and the count."""
    excluded = int(df["problem"].isin(exclude).sum())
    df = df[~df["problem"].isin(exclude)]
    kept = filter_problems(
        df, subjects=block.get("subjects"), levels=block.get("levels"), max_answer_chars=block.get("max_answer_chars")
    )
    n = block.get("n")
    if n is not None and n > len(kept):
        filters = [f"{key}.{name}" for name in _FILTERS if block.get(name) is not None]
        why = "have a boxed answer" + (f" and pass {', '.join(filters)}" if filters else "")
        why += f" ({excluded} few-shot problem(s) excluded)" if excluded else ""
        raise ValueError(
            f"params.yaml: {key}.n = {n} but only {len(kept)} {what or 'MATH'} problems {why}; "
            "lower it, or use null for all"
        )
    return filter_problems(kept, n=n, seed=block.get("seed", 0), select=block.get("select", "sample"))


def with_prompts(df: pd.DataFrame, prompt: dict) -> pd.DataFrame:
    """`df` plus its `prompt` column: chat messages (`format: chat`) or a plain string (`format: raw`)."""
    df = df.copy()
    if prompt.get("format", "chat") == "raw":
        df["prompt"] = [raw_prompt(p, prompt["template"]) for p in df["problem"]]
    else:
        shots = [(s["problem"], s["answer"]) for s in prompt.get("few_shot") or []]
        df["prompt"] = [build_prompt(p, shots, prompt.get("system")) for p in df["problem"]]
    return df.reset_index(drop=True)


def synthetic_pool(name: str, n_train: int, n_eval: int, seed: int, exclude: set[str]) -> pd.DataFrame:
    """The first `n_train` + `n_eval` problems of one seeded draw of source `name`, few-shot problems removed:
    training takes the head and evaluation the rest, so the two never share a problem."""
    n = n_train + n_eval
    try:
        pool = SYNTHETIC[name](n + len(exclude), seed=seed)
    except ValueError as err:
        asked = [(f"data.train.n ({n_train})", n_train), (f"data.eval.{name}.n ({n_eval})", n_eval)]
        keys = " + ".join(key for key, count in asked if count)
        raise ValueError(f"params.yaml: {keys} ask for too many {name} problems ({err}); lower them") from err
    pool = pool[~pool["problem"].isin(exclude)].head(n)
    return pool.assign(source_row=range(len(pool)))


def build_tables(data: dict, prompt: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(train, eval, counts); few-shot problems are excluded from both so no answer leaks."""
    exclude = {s["problem"] for s in prompt.get("few_shot") or []}
    train_block, eval_blocks = data["train"], data["eval"]
    counts: dict[str, dict] = {}
    pools = {}
    for name in SYNTHETIC:
        n_train = train_block["n"] if train_block["source"] == name else 0
        n_eval = eval_blocks.get(name, {}).get("n", 0)
        if n_train or n_eval:
            pools[name] = synthetic_pool(name, n_train, n_eval, train_block.get("seed", 0), exclude)
    if train_block["source"] in SYNTHETIC:
        train = pools[train_block["source"]].head(train_block["n"])
    else:
        train, counts["math_train"] = normalize_table(load_math(data, "train"))
        train = select(train, train_block, exclude, "data.train", "MATH train")
    evals = []
    for name, block in sorted(eval_blocks.items()):
        if name in SYNTHETIC:
            n_train = train_block["n"] if train_block["source"] == name else 0
            part = pools[name].iloc[n_train : n_train + block["n"]].assign(split="test")
        else:
            split = eval_split(data, block)
            part, counts[f"{name}_test"] = normalize_table(load_math(data, "test", split))
            part = select(part, block, exclude, f"data.eval.{name}", f"MATH {split}")
        evals.append(part.assign(eval_set=name))
    eval_df = pd.concat(evals, ignore_index=True)
    counts["rows"] = {"train": len(train), **{k: int(v) for k, v in eval_df["eval_set"].value_counts().items()}}
    return with_prompts(train, prompt), with_prompts(eval_df, prompt), counts


@click.command()
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default="data/prepared", type=click.Path(file_okay=False))
@click.option("--metrics", default="metrics/prepare.json", type=click.Path(dir_okay=False))
def main(params_path: str, out: str, metrics: str) -> None:
    params = load_valid(params_path)[0]  # the whole file first (the validate stage has also built these tables)
    data, prompt = section(params, "data"), section(params, "prompt")
    try:  # every params check is the schema's (`load_valid`); what is left needs the data: `n` against the source
        train, eval_df, counts = build_tables(data, prompt)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
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
