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
from arca.tasks.grading import extract_boxed
from arca.tasks.prompts import PROBLEM_FIELD, build_prompt, raw_prompt
from arca.tasks.reasoning import reasoning_problems
from arca.tasks.sources import SELECTIONS, filter_problems, load_embedded, load_hub, load_math_path, normalize_table
from stages.common import load_valid, section

SOURCES = ("embedded", "path", "hub")
# Seeded generated sources: name -> f(n, seed=...) -> problem table; each name is also an eval set (`data.eval.<name>`).
SYNTHETIC = {"arithmetic": arithmetic_problems, "reasoning": reasoning_problems}
TRAIN_SOURCES = ("arithmetic", "math", "reasoning")
EVAL_SPLITS = ("math500", "test")
PROMPT_FORMATS = ("chat", "raw")
_FILTERS = ("levels", "subjects", "max_answer_chars")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def eval_split(data: dict, block: dict) -> str:
    """The MATH split a `data.eval.<set>` block reads: its `split`, else the source's default (module docstring)."""
    return block.get("split") or ("math500" if data.get("source") == "embedded" else "test")


def _check_eval_block(data: dict, key: str, block: dict) -> None:
    split = block.get("split")
    if split is not None and split not in EVAL_SPLITS:
        raise ValueError(f"params.yaml: {key}.split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    if split == "math500" and data["source"] == "hub":
        raise ValueError(
            f"params.yaml: {key}.split: math500 cannot come from data.source hub (data.hub_name is one dataset for "
            "train and test); use split: test, or data.source: embedded"
        )
    path = Path(data.get("path") or "")
    if split == "math500" and data["source"] == "path" and not path.name.lower().endswith((".jsonl", ".parquet")):
        raise ValueError(
            f"params.yaml: {key}.split: math500 but data.path {path} is a MATH tarball or folder, which holds the "
            "full 5,000-problem test split; use split: test, point data.path at a MATH-500 .jsonl, or use "
            "data.source: embedded"
        )


def check_prompt(prompt: dict) -> None:
    """`prompt.format` and what each format allows; the errors name the key and the fix."""
    fmt = prompt.get("format", "chat")
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"params.yaml: prompt.format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}")
    template = prompt.get("template")
    if fmt == "chat":
        if template is not None:
            raise ValueError("params.yaml: prompt.template is used only with prompt.format: raw; remove it or set raw")
        for index, shot in enumerate(prompt.get("few_shot") or []):  # the model learns its answer format here
            if not isinstance(shot, dict) or extract_boxed(str(shot.get("answer", ""))) is None:
                raise ValueError(
                    f"params.yaml: prompt.few_shot[{index}].answer has no complete \\boxed{{...}}; end it with one"
                )
        return
    if not isinstance(template, str) or PROBLEM_FIELD not in template:
        raise ValueError(
            f"params.yaml: prompt.template must be a string containing {PROBLEM_FIELD} when prompt.format is raw, "
            f"got {template!r}"
        )
    if prompt.get("few_shot"):
        raise ValueError(
            "params.yaml: prompt.few_shot must be empty when prompt.format is raw (the template is the whole "
            "prompt); use [] or prompt.format: chat"
        )
    if prompt.get("system") is not None:
        raise ValueError(
            "params.yaml: prompt.system must be null when prompt.format is raw (put the instruction in "
            "prompt.template); use null or prompt.format: chat"
        )


def check_params(data: dict, prompt: dict | None = None) -> None:
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
    blocks = [("data.train", train, train["source"] == "math")]
    blocks += [(f"data.eval.{k}", v, k not in SYNTHETIC) for k, v in section(data, "eval").items()]
    for key, block, is_math in blocks:
        if not isinstance(block, dict):
            raise ValueError(f"params.yaml: {key} must be a mapping (n, levels, subjects, ...), got {block!r}")
        n = block.get("n")
        if not (_positive_int(n) or (n is None and is_math)):
            allowed = "a positive int, or null for every usable problem" if is_math else "a positive int"
            raise ValueError(f"params.yaml: {key}.n must be {allowed}, got {n!r}")
        for name in ("levels", "subjects"):
            if block.get(name) is not None and not block.get(name):
                raise ValueError(f"params.yaml: {key}.{name} is empty; use null for no filter")
        if is_math and block.get("select", "sample") not in SELECTIONS:
            raise ValueError(
                f"params.yaml: {key}.select must be one of {', '.join(SELECTIONS)}, got {block.get('select')!r}"
            )
        if key.startswith("data.eval.") and is_math:
            _check_eval_block(data, key, block)
    probe_n = section(data, "probe").get("n")
    if not _positive_int(probe_n):
        raise ValueError(f"params.yaml: data.probe.n must be a positive int, got {probe_n!r}")
    if prompt is not None:
        check_prompt(prompt)


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
    try:
        check_params(data, prompt)
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
