"""Stage `diagnose`: concentration diagnostics per signal x run x checkpoint, signal agreement, and the
precision noise of low-precision runs (SPEC 2b).

    python -m stages.diagnose [--params params.yaml]

Reads data/dumps/*.parquet; writes data/diagnostics/{trajectories,summary,agreement,noise}.parquet and
metrics/diagnostics.json (final-checkpoint means per signal, over normalized weights, plus the noise share and
rank correlation of every signal recomputed in float32). noise.parquet is empty (same columns) when no dump
has `a32_` columns, i.e. every run is float32.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import click
import pandas as pd

from stages.common import load_valid, section
from stages.credit_params import credit_config

OUT = Path("data/diagnostics")
log = logging.getLogger("stages.diagnose")


def read_dumps(folder: Path = Path("data/dumps")) -> pd.DataFrame:
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no dumps; run the dump stages first (dvc repro dump)")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def _rounded(value: float) -> float | None:
    """6 decimals; None for NaN or inf, which JSON (and so DVC's metrics) cannot hold."""
    return round(float(value), 6) if math.isfinite(value) else None


def final_metrics(summary: pd.DataFrame, noise: pd.DataFrame) -> dict:
    """Per signal, means over runs at the final checkpoint; `noise_share`/`rank_corr` only for signals with
    a float32 recomputation."""
    final = summary[(summary["phase"] == "final") & (summary["over"] == "weight")]
    out: dict = {}
    for signal, frame in final.groupby("signal", sort=True):
        out[signal] = {
            "gini": _rounded(frame["gini_mean"].mean()),
            "etr": _rounded(frame["etr_mean"].mean()),
            "frac_concentrated": _rounded(frame["frac_concentrated"].mean()),
            "frac_uniform": _rounded(frame["frac_uniform"].mean()),
        }
    for signal, frame in noise[noise["phase"] == "final"].groupby("signal", sort=True):
        out.setdefault(signal, {}).update(
            noise_share=_rounded(frame["noise_share"].mean()), rank_corr=_rounded(frame["rank_corr"].mean())
        )
    return out


@click.command()
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
def main(params_path: str) -> None:
    params = load_valid(params_path)[0]  # the whole file first: ~1 s, before torch loads
    diag, credit = section(params, "diagnostics"), section(params, "credit")
    tokens = diag["formatting_tokens"]
    from arca.analysis.concentration import dump_signals, noise_table, signal_agreement, trajectory_table
    from arca.credit.diagnostics import aggregate  # heavy imports (torch) only after validation
    from arca.io import write_json, write_parquet

    dumps = read_dumps()
    signals = dump_signals(dumps.columns)
    traj = trajectory_table(
        dumps,
        signals,
        tokens,
        eps=float(credit.get("eps", 1e-8)),
        sharpening=float(credit.get("sharpening", 1.0)),
        fallback=credit.get("fallback", "raw_mean"),
        top_frac=float(diag.get("top_frac", 0.05)),
        etr_uniform=float(diag["etr_uniform"]),
        etr_concentrated=float(diag["etr_concentrated"]),
    )
    fallback = traj.groupby(["run", "step", "signal", "over"], sort=True)["fallback"].mean().rename("fallback_rate")
    summary = aggregate(traj, ["run", "method", "rank", "seed", "step", "phase", "signal", "over"])
    summary = summary.merge(fallback.reset_index(), on=["run", "step", "signal", "over"])
    # a32 is normalized exactly as the dump normalized a: with the credit params of the run's method (a
    # permuted run, `arca_perm`, was dumped with its signal's params: `credit_config` strips the suffix).
    noise = noise_table(dumps, {m: credit_config(params, m) for m in sorted(dumps["method"].unique())})
    if noise.empty:
        log.info("no dump has a32_ columns (every run is float32): noise.parquet is empty")
    write_parquet(OUT / "trajectories.parquet", traj)
    write_parquet(OUT / "summary.parquet", summary)
    write_parquet(OUT / "agreement.parquet", signal_agreement(dumps, signals))
    write_parquet(OUT / "noise.parquet", noise)
    write_json("metrics/diagnostics.json", final_metrics(summary, noise))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
