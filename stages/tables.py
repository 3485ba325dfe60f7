"""Stage `tables`: the study's results under results/ as Markdown, CSV and LaTeX, each row carrying its
run ids, the md5 (as in dvc.lock) of the adapter or dump it came from, and the git revision.

    python -m stages.tables [--params params.yaml]

Tables: accuracy, concentration (noise-dominated signals marked when a run is low-precision), agreement,
and noise (SPEC 2b: each signal's rounding noise against float32; one line saying so when every run is
float32).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
import pandas as pd

from arca.io import read_json, write_json, write_text
from arca.lineage import dvc_md5, git_revision
from arca.tables import (
    NO_LOW_PRECISION,
    NOISE_FOOTNOTE,
    accuracy_table,
    agreement_table,
    concentration_table,
    noise_summary_table,
    to_latex,
    to_markdown,
)

RESULTS = Path("results/tables")


def read_evals() -> pd.DataFrame:
    rows = []
    for path in sorted(Path("data/eval").glob("*.json")):
        record = read_json(path)
        for eval_set, stats in record["sets"].items():
            mean_k = next((v for k, v in stats.items() if k.startswith("mean@")), float("nan"))
            rows.append(
                {
                    "run": record["run"],
                    "method": record["method"],
                    "rank": record["rank"],
                    "seed": record["seed"],
                    "eval_set": eval_set,
                    "pass@1": stats["pass@1"],
                    "mean@k": mean_k,
                }
            )
    if not rows:
        raise FileNotFoundError("data/eval holds no results; run the evaluate stages first")
    return pd.DataFrame(rows)


def read_budgets() -> pd.DataFrame:
    rows = [read_json(p) | {"run": p.parent.name} for p in sorted(Path("data/runs").glob("*/budget.json"))]
    return (
        pd.DataFrame(rows, columns=["run", "rollouts", "generated_tokens"])
        if not rows
        else pd.DataFrame(rows)[["run", "rollouts", "generated_tokens"]]
    )


def lineage(runs: list[str]) -> pd.DataFrame:
    rows = []
    for run in runs:
        adapter, dump = Path("data/runs") / run / "adapter", Path("data/dumps") / f"{run}.parquet"
        rows.append(
            {
                "run": run,
                "adapter_md5": dvc_md5(adapter) if adapter.is_dir() else None,
                "dump_md5": dvc_md5(dump) if dump.is_file() else None,
            }
        )
    return pd.DataFrame(rows, columns=["run", "adapter_md5", "dump_md5"])


def write_table(name: str, df: pd.DataFrame, caption: str, note: str | None = None, empty: str | None = None) -> None:
    """`name`.{md,csv,tex}; `note` goes under the table, `empty` replaces an empty one (the CSV keeps the header)."""
    if df.empty and empty:
        note, body = empty, empty + "\n"
    else:
        body = to_markdown(df) + (f"\n{note}\n" if note else "")
    write_text(RESULTS / f"{name}.md", f"<!-- {caption} -->\n" + body)
    write_text(RESULTS / f"{name}.csv", df.to_csv(index=False, lineterminator="\n"))
    write_text(RESULTS / f"{name}.tex", to_latex(df, caption, note))


@click.command()
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
def main(params_path: str) -> None:
    evals = read_evals()
    summary = pd.read_parquet("data/diagnostics/summary.parquet")
    agreement = pd.read_parquet("data/diagnostics/agreement.parquet")
    noise = pd.read_parquet("data/diagnostics/noise.parquet")
    runs = sorted(set(evals["run"]) | set(summary["run"]))
    lin = lineage(runs)
    rev = git_revision()
    tables = {
        "accuracy": (
            accuracy_table(evals, read_budgets(), lin),
            "Held-out accuracy per method x rank, mean ± std over seeds, with the rollout budget",
        ),
        "concentration": (
            concentration_table(summary, lin, noise),
            "Credit-weight concentration per signal x rank x training phase (probe rollouts, normalized weights)",
        ),
        "agreement": (
            agreement_table(agreement, summary, lin),
            "Signal agreement: mean within-trajectory Spearman correlation of normalized weights",
        ),
        "noise": (
            noise_summary_table(noise, lin),
            "Precision noise per signal x rank x phase: saliences a in the run's dtype against their float32 "
            "recomputation a32; gini, etr of the weights from a, gini_fp32, etr_fp32 from a32",
        ),
    }
    for name, (df, caption) in tables.items():
        note = NOISE_FOOTNOTE if "noise_dominated" in df.columns else None
        write_table(name, df.assign(git_rev=rev), caption, note, empty=NO_LOW_PRECISION if name == "noise" else None)
    headline = {
        run: {row["eval_set"]: {"pass@1": row["pass@1"], "mean@k": row["mean@k"]} for _, row in part.iterrows()}
        for run, part in evals.groupby("run", sort=True)
    }
    write_json("metrics/accuracy.json", headline)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
