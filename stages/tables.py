"""Stage `tables`: the study's results under results/ as Markdown, CSV and LaTeX, each row carrying its
run ids, the md5 (as in dvc.lock) of the adapter or dump it came from, and the git revision.

    python -m stages.tables [--params params.yaml]

Tables: accuracy (95% intervals over problems, spread over seeds, paired difference to uniform: arca.analysis.stats;
the CSV holds the numbers, Markdown and LaTeX the formatted cells), concentration (noise-dominated signals
marked when a run is low-precision), agreement, and noise (SPEC 2b: each signal's rounding noise against
float32; one line saying so when every run is float32), and training (the ARCA paper's columns per run:
mean train reward, Gini and EffN/T over every logged step, from each run's metrics.json and log.tsv), and
faithfulness (SPEC 9: auc, lift, top_hit of every signal and its permutation control, from
data/faithfulness/*/scores.parquet), and degeneration (SPEC 10: every signal's concentration against the adapter
scale c, from data/degeneration/degeneration.parquet).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
import pandas as pd

from arca.analysis.degeneration_report import NOTE as DEGENERATION_NOTE
from arca.analysis.degeneration_report import degeneration_table
from arca.analysis.faithfulness_table import FAITHFULNESS_FOOTNOTE, faithfulness_cells, ordered
from arca.analysis.lineage import dvc_md5, git_revision
from arca.analysis.tables import (
    ACCURACY_FOOTNOTE,
    NO_LOW_PRECISION,
    NOISE_FOOTNOTE,
    accuracy_stats,
    accuracy_table,
    agreement_table,
    concentration_table,
    noise_summary_table,
    run_accuracy,
    to_latex,
    to_markdown,
)
from arca.analysis.training_table import TRAINING_FOOTNOTE, training_cells, training_table
from arca.io import read_json, write_json, write_text
from stages.common import load_valid

RESULTS = Path("results/tables")


# grader -> prefix of its per-problem columns in data/eval/<run>.parquet (as arca.sampling.evaluation.PREFIXES; not
# imported, so this stage needs no torch): greedy 0/1, mean_k, pass_k. A grader is reported where its greedy
# column is present; pass_k is absent in evaluations written before it existed.
GRADER_PREFIXES = {"math_verify": "", "exact": "exact_"}


def read_scores() -> pd.DataFrame:
    """One row per run x grader x problem: run, method, rank, seed, k, grader, eval_set, prompt_id, pass@1,
    mean@k, pass@k (NaN where a run has none: k = 0, or no pass_k column), from each evaluated run's JSON
    (identity, k) and its per-problem Parquet (scores)."""
    frames = []
    for path in sorted(Path("data/eval").glob("*.json")):
        record = read_json(path)
        per_problem_path = path.with_suffix(".parquet")
        if not per_problem_path.is_file():
            raise FileNotFoundError(f"{per_problem_path}: per-problem scores missing; run `dvc repro evaluate` first")
        per_problem = pd.read_parquet(per_problem_path)
        k = int(record.get("k", 0))
        for grader, prefix in GRADER_PREFIXES.items():
            if f"{prefix}greedy" not in per_problem.columns:
                continue
            frame = per_problem[["prompt_id", "eval_set"]].copy()
            frame["pass@1"] = per_problem[f"{prefix}greedy"].astype(float)
            for score, column in (("mean@k", f"{prefix}mean_k"), ("pass@k", f"{prefix}pass_k")):
                present = k > 0 and column in per_problem.columns
                frame[score] = per_problem[column].astype(float) if present else float("nan")
            identity = {key: record[key] for key in ("run", "method", "rank", "seed")}
            frames.append(frame.assign(**identity, k=k, grader=grader))
    if not frames:
        raise FileNotFoundError("data/eval holds no results; run the evaluate stages first")
    return pd.concat(frames, ignore_index=True)


def read_budgets() -> pd.DataFrame:
    rows = [read_json(p) | {"run": p.parent.name} for p in sorted(Path("data/runs").glob("*/budget.json"))]
    return (
        pd.DataFrame(rows, columns=["run", "rollouts", "generated_tokens"])
        if not rows
        else pd.DataFrame(rows)[["run", "rollouts", "generated_tokens"]]
    )


def read_training() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(metrics, logs, budgets) of every trained run: data/runs/<run>/{metrics.json, log.tsv, budget.json}."""
    dirs = sorted(p.parent for p in Path("data/runs").glob("*/metrics.json"))
    metrics = pd.DataFrame([read_json(d / "metrics.json") | {"run": d.name} for d in dirs])
    budgets = pd.DataFrame([read_json(d / "budget.json") | {"run": d.name} for d in dirs])
    budgets = budgets.reindex(columns=["run", "rollouts", "generations"])  # identity columns come from metrics
    logs = [pd.read_csv(d / "log.tsv", sep="\t").assign(run=d.name) for d in dirs if (d / "log.tsv").is_file()]
    return metrics, pd.concat(logs, ignore_index=True) if logs else pd.DataFrame(columns=["run"]), budgets


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


def read_faithfulness(lin: pd.DataFrame) -> pd.DataFrame:
    """Every data/faithfulness/<run>/scores.parquet (SPEC 9, one row per signal x step), with the run's adapter
    and dump md5 and the md5 of its faithfulness output (as in dvc.lock); empty when no run has one."""
    frames = [pd.read_parquet(p) for p in sorted(Path("data/faithfulness").glob("*/scores.parquet"))]
    if not frames:
        return pd.DataFrame(columns=["signal", "run", "step"])
    scores = pd.concat(frames, ignore_index=True)
    extra = lineage(sorted(set(scores["run"]) - set(lin["run"])))
    md5 = {run: dvc_md5(Path("data/faithfulness") / run) for run in sorted(set(scores["run"]))}
    scores = scores.merge(pd.concat([lin, extra], ignore_index=True), on="run", how="left")
    return ordered(scores.assign(faithfulness_md5=scores["run"].map(md5)))


def write_table(
    name: str,
    df: pd.DataFrame,
    caption: str,
    note: str | None = None,
    empty: str | None = None,
    csv: pd.DataFrame | None = None,
) -> None:
    """`name`.{md,csv,tex}; `note` goes under the table, `empty` replaces an empty one (the CSV keeps the header);
    `csv`, when given, is what the CSV holds instead of `df` (numbers rather than formatted cells)."""
    if df.empty and empty:
        note, body = empty, empty + "\n"
    else:
        body = to_markdown(df) + (f"\n{note}\n" if note else "")
    write_text(RESULTS / f"{name}.md", f"<!-- {caption} -->\n" + body)
    write_text(RESULTS / f"{name}.csv", (df if csv is None else csv).to_csv(index=False, lineterminator="\n"))
    write_text(RESULTS / f"{name}.tex", to_latex(df, caption, note))


@click.command()
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
def main(params_path: str) -> None:
    load_valid(params_path)  # reads no params, but a bad params file fails every stage first
    scores = read_scores()
    summary = pd.read_parquet("data/diagnostics/summary.parquet")
    agreement = pd.read_parquet("data/diagnostics/agreement.parquet")
    noise = pd.read_parquet("data/diagnostics/noise.parquet")
    runs = sorted(set(scores["run"]) | set(summary["run"]))
    lin = lineage(runs)
    rev = git_revision()
    accuracy = accuracy_stats(scores, read_budgets(), lin)
    write_table(
        "accuracy",
        accuracy_table(accuracy).assign(git_rev=rev),
        "Held-out accuracy per grader x eval set x method x rank with 95% intervals over problems (one seed) "
        "or mean ± std over seeds, the paired difference to uniform, and the rollout budget",
        ACCURACY_FOOTNOTE,
        csv=accuracy.round(6).assign(git_rev=rev),
    )
    tables = {
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
    training = training_table(*read_training()).merge(lin[["run", "adapter_md5"]], on="run", how="left")
    write_table(
        "training",
        training_cells(training).merge(lin[["run", "adapter_md5"]], on="run", how="left").assign(git_rev=rev),
        "Training per run, the ARCA paper's columns: mean train reward, Gini and EffN/T (= ETR) over every logged "
        "step, and the fallback share",
        TRAINING_FOOTNOTE,
        csv=training.round(6).assign(git_rev=rev),
    )
    faithfulness = read_faithfulness(lin)
    write_table(
        "faithfulness",
        (faithfulness_cells(faithfulness) if len(faithfulness) else faithfulness).assign(git_rev=rev),
        "Counterfactual faithfulness per signal x run x step: does the weight sit on the tokens whose change flips "
        "the reward? (95% bootstrap intervals over completions; permuted rows are the chance controls)",
        FAITHFULNESS_FOOTNOTE,
        empty="No faithfulness results: faithfulness.runs names no run with effects (SPEC 9).",
        csv=faithfulness.round(6).assign(git_rev=rev),
    )
    degeneration_path = Path("data/degeneration/degeneration.parquet")
    degeneration = pd.read_parquet(degeneration_path) if degeneration_path.is_file() else pd.DataFrame()
    cells = degeneration_table(degeneration, lin) if len(degeneration) else degeneration
    write_table(
        "degeneration",
        cells.assign(git_rev=rev),
        "The degeneration map (SPEC 10): concentration of every signal against adapter size, each LoRA update "
        "times c, on the run's own probe completions at its final checkpoint",
        DEGENERATION_NOTE,
        empty="No degeneration map: data/degeneration/degeneration.parquet is missing (run the degeneration stage).",
        csv=(degeneration.round(8).merge(lin, on="run", how="left") if len(degeneration) else cells).assign(
            git_rev=rev
        ),
    )
    write_json("metrics/accuracy.json", run_accuracy(scores))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
