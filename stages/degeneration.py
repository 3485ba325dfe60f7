"""Stage `degeneration`: the degeneration map (SPEC 10), concentration of every signal against adapter size.

    python -m stages.degeneration [--params params.yaml]

For each run of `degeneration.runs` (null: every run of study.runs), its final adapter snapshot is scaled by
every `c` of `degeneration.scales` (every LoRA update times c; arca.sampling.scaling) and teacher-forced on the
run's own probe completions at that step (data/dumps/<run>.parquet with the prompts of
data/prepared/probe.parquet), so the tokens never change with c. Every signal's raw saliences are normalized
with the shared credit keys, in the run's dtype and, when that is not float32, in float32 too.

Writes data/degeneration/degeneration.parquet: one row per run x signal x c x dtype with mean Gini, ETR,
agnostic share, fallback share, the noise share against float32 (NaN for float32 rows), the mean per-token
exact KL(pi_c || pi_ref) (kl in that dtype, kl32 in float32) and the relative update size.
Cost per run: per batch one adapter-off pass and one adapter-on pass per scale (twice for a non-float32 run).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import pandas as pd

from stages.common import load_valid, section
from stages.credit_params import credit_config

if TYPE_CHECKING:
    import torch

log = logging.getLogger("stages.degeneration")
OUT = Path("data/degeneration/degeneration.parquet")


def degeneration_params(params: dict) -> dict:
    """The `degeneration` section, checked (errors name the key): scales, batch_size, runs (ids or null)."""
    cfg = section(params, "degeneration")
    scales = cfg.get("scales")
    ok = isinstance(scales, list) and scales and all(type(c) in (int, float) and math.isfinite(c) for c in scales)
    if not ok or min(scales) < 0 or len(set(scales)) != len(scales):
        raise ValueError(f"params.yaml: degeneration.scales must be a list of distinct numbers >= 0, got {scales!r}")
    batch = cfg.get("batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"params.yaml: degeneration.batch_size must be a positive int, got {batch!r}")
    runs, known = cfg.get("runs"), list(section(params, "study").get("runs") or {})
    if runs is not None and not (isinstance(runs, list) and runs and set(runs) <= set(known)):
        raise ValueError(
            f"params.yaml: degeneration.runs must be null or a list of ids of study.runs {known}, got {runs}"
        )
    return {"scales": [float(c) for c in sorted(scales)], "batch_size": batch, "runs": runs or known}


def run_map(run: str, base, tokenizer, params: dict, cfg: dict, dtype: torch.dtype) -> tuple[list[pd.DataFrame], Any]:
    """The `scale_summary` rows of one run (every scale x dtype), and the base model back (adapter unloaded)."""
    import torch

    from arca.analysis.degeneration import scale_summary
    from arca.credit.precision import float32_weights
    from arca.credit.signals import SIGNAL_NAMES
    from arca.io import read_json
    from arca.sampling.degeneration import rollouts_from_dump, scaled_saliences, token_frame
    from arca.sampling.dump import a32_signals, normalized
    from arca.sampling.scaling import relative_update_size
    from stages.runs import snapshots, with_adapter

    run_dir = Path("data/runs") / run
    method = read_json(run_dir / "budget.json")["method"]
    step, adapter_dir = list(snapshots(run_dir).items())[-1]
    dump = pd.read_parquet(Path("data/dumps") / f"{run}.parquet")
    dump = dump[dump["step"] == step]
    if dump.empty:
        raise FileNotFoundError(f"data/dumps/{run}.parquet has no rows at step {step} (its last snapshot); rerun dump")
    probe = pd.read_parquet("data/prepared/probe.parquet")
    kwargs = section(params, "model").get("chat_template_kwargs")
    rollouts, rows = rollouts_from_dump(tokenizer, dump, dict(zip(probe["prompt_id"], probe["prompt"])), kwargs)
    credits = {m: credit_config(params, m) for m in sorted(rows["method"].unique())}
    credit = credits[rows["method"].iloc[0]]
    tokens = section(params, "diagnostics")["formatting_tokens"]
    temperature = section(params, "train").get("temperature", 1.0)
    model = with_adapter(base, adapter_dir)
    sizes = {c: relative_update_size(model, c) for c in cfg["scales"]}
    passes = {"float32": float32_weights(model) if dtype != torch.float32 else nullcontext()}
    if dtype != torch.float32:
        passes = {str(dtype).removeprefix("torch."): nullcontext(), **passes}
    saliences = {}
    for name, context in passes.items():
        with context:
            saliences[name] = scaled_saliences(
                model, rollouts, cfg["scales"], SIGNAL_NAMES, layer=credit.layer, batch_size=cfg["batch_size"],
                temperature=temperature,
            )  # fmt: skip
    checked = a32_signals(dtype, SIGNAL_NAMES)
    parts = []
    for name, per_scale in saliences.items():
        for c, raw in per_scale.items():
            frame = token_frame(rows, rollouts, normalized(raw, rollouts, credit))
            if name != "float32":  # the float32 truth of the same tokens and scale beside the run's dtype
                mask = rollouts.completion_mask[:, rollouts.prompt_length :].bool()
                for s in checked:
                    frame[f"a32_{s}"] = saliences["float32"][c][s][mask].numpy()
            summary = scale_summary(frame, SIGNAL_NAMES, tokens, credits, eps=credit.eps)
            parts.append(summary.assign(scale=c, dtype=name, update_size=sizes[c]))
    log.info("%s (%s, step %d, method %s): %d completions x %d scales", run, dtype, step, method,
             rollouts.input_ids.shape[0], len(cfg["scales"]))  # fmt: skip
    return parts, model.unload()


@click.command()
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
def main(params_path: str) -> None:
    params = load_valid(params_path)[0]  # the whole file first: ~1 s, before torch loads
    try:  # a params error is one line and a non-zero exit, never a traceback
        cfg = degeneration_params(params)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    tokens = section(params, "diagnostics")["formatting_tokens"]
    from arca.analysis.degeneration import degeneration_rows  # heavy imports (torch) only after validation
    from arca.io import write_parquet
    from arca.models.base import resolve_dtype
    from stages.runs import load_base_model, params_hash

    dtype_name = section(params, "model").get("dtype", "auto")
    dtype = resolve_dtype(dtype_name)
    base, tokenizer = load_base_model(dtype_name)
    parts = []
    for run in cfg["runs"]:
        start = time.monotonic()
        found, base = run_map(run, base, tokenizer, params, cfg, dtype)
        parts += found
        log.info("%s: %.1f s", run, time.monotonic() - start)
    phash = params_hash(
        {k: section(params, "model").get(k) for k in ("dtype", "chat_template_kwargs")},
        section(params, "train").get("temperature"),
        params.get("credit"),
        tokens,
        params.get("degeneration"),
    )
    write_parquet(OUT, degeneration_rows(parts), metadata={"arca.params_md5": phash, "arca.dtype": str(dtype)})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
