"""Stage `summary`: the headline metrics, metrics/summary/<cell>.json, one file per method x rank with the same
keys (arca.analysis.summary), the only DVC metrics of the pipeline, so `dvc metrics show` is one table and
`dvc metrics diff main <exp>` one line per headline number an experiment moved (README "Compare variations").

    python -m stages.summary [--params params.yaml]

Reads results/tables/accuracy.csv (pass@1 with its interval, from the tables stage), data/diagnostics/
{summary,noise}.parquet and data/faithfulness/<run>/scores.parquet; reads no params.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import click
import pandas as pd

from arca.analysis.summary import headline
from arca.io import write_json
from stages.common import load_valid

OUT = Path("metrics/summary")
ACCURACY = Path("results/tables/accuracy.csv")
DIAGNOSTICS = Path("data/diagnostics")
FAITHFULNESS = Path("data/faithfulness")
log = logging.getLogger("stages.summary")


def read_faithfulness() -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted(FAITHFULNESS.glob("*/scores.parquet"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run", "step", "signal"])


@click.command()
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
def main(params_path: str) -> None:
    load_valid(params_path)  # reads no params, but a bad params file fails every stage first
    if not ACCURACY.is_file():
        raise click.ClickException(f"missing {ACCURACY}: run the tables stage first (dvc repro tables)")
    cells = headline(
        pd.read_csv(ACCURACY),
        pd.read_parquet(DIAGNOSTICS / "summary.parquet"),
        pd.read_parquet(DIAGNOSTICS / "noise.parquet"),
        read_faithfulness(),
    )
    shutil.rmtree(OUT, ignore_errors=True)  # a cell gone from study.runs leaves no stale row (DVC clears it too)
    for name, metrics in cells.items():
        write_json(OUT / f"{name}.json", metrics)
    log.info("wrote %d headline cells to %s/", len(cells), OUT)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
