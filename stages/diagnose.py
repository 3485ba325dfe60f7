"""Stage `diagnose`: concentration diagnostics per signal x run x checkpoint, and signal agreement.

    python -m stages.diagnose [--params params.yaml]

Reads data/dumps/*.parquet; writes data/diagnostics/{trajectories,summary,agreement}.parquet and
metrics/diagnostics.json (final-checkpoint means per signal, over normalized weights).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
import pandas as pd

from arca.concentration import signal_agreement, trajectory_table
from arca.diagnostics import aggregate
from arca.io import write_json, write_parquet
from arca.signals import SIGNAL_NAMES
from stages.common import load_params, section

OUT = Path("data/diagnostics")


def read_dumps(folder: Path = Path("data/dumps")) -> pd.DataFrame:
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no dumps; run the dump stages first (dvc repro dump)")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def final_metrics(summary: pd.DataFrame) -> dict:
    final = summary[(summary["phase"] == "final") & (summary["over"] == "weight")]
    out: dict = {}
    for signal, frame in final.groupby("signal", sort=True):
        out[signal] = {
            "gini": round(float(frame["gini_mean"].mean()), 6),
            "etr": round(float(frame["etr_mean"].mean()), 6),
            "frac_concentrated": round(float(frame["frac_concentrated"].mean()), 6),
            "frac_uniform": round(float(frame["frac_uniform"].mean()), 6),
        }
    return out


@click.command()
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
def main(params_path: str) -> None:
    params = load_params(params_path)
    diag, credit = section(params, "diagnostics"), section(params, "credit")
    tokens = diag.get("formatting_tokens")
    if not isinstance(tokens, list):
        raise ValueError("params.yaml: diagnostics.formatting_tokens must be a list of strings")
    dumps = read_dumps()
    traj = trajectory_table(
        dumps,
        SIGNAL_NAMES,
        tokens,
        eps=float(credit.get("eps", 1e-8)),
        top_frac=float(diag.get("top_frac", 0.05)),
        etr_uniform=float(diag["etr_uniform"]),
        etr_concentrated=float(diag["etr_concentrated"]),
    )
    fallback = traj.groupby(["run", "step", "signal", "over"], sort=True)["fallback"].mean().rename("fallback_rate")
    summary = aggregate(traj, ["run", "method", "rank", "seed", "step", "phase", "signal", "over"])
    summary = summary.merge(fallback.reset_index(), on=["run", "step", "signal", "over"])
    write_parquet(OUT / "trajectories.parquet", traj)
    write_parquet(OUT / "summary.parquet", summary)
    write_parquet(OUT / "agreement.parquet", signal_agreement(dumps, list(SIGNAL_NAMES)))
    write_json("metrics/diagnostics.json", final_metrics(summary))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
