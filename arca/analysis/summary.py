"""The headline metrics (metrics/summary/<cell>.json): one small file per method x rank with the same keys in
every profile, so `dvc metrics show` reads as one table (a row per cell) and `dvc metrics diff` / `dvc exp show`
name exactly the headline numbers an experiment moved.

Per cell: the pass@1 of every eval set (`<set>`; math-verify, from the accuracy table) with its 95% interval
(`<set>_ci`: [low, high]), and where the cell's own signal has them, at each run's final checkpoint, averaged
over the cell's runs (seeds): `gini`, `etr` (SPEC 5, probe dumps), `auc`, `lift` (SPEC 9, where faithfulness
scored the cell's runs) and `noise_share` (SPEC 2b, low-precision runs only). A key a cell cannot have is left
out, not written as null: DVC shows `-` there. Values are rounded to 3 decimals. The interval is a list, which
DVC's tables leave out (`dvc metrics show --json` has it): two more columns per eval set would take the default's
table past 120 columns, and a point estimate moves whenever its interval does.

Left out: mean@k, pass@k and the paired differences (results/tables/accuracy.csv holds them), per-run training
summaries (data/runs/<run>/metrics.json, read by the tables stage).
"""

from __future__ import annotations

import math

import pandas as pd

from arca.methods import PERMUTED_SUFFIX

BASE_CELL = "base"  # the base model's row of the accuracy table (rank 0)
GRADER = "math_verify"  # the headline grader, as the README's accuracy table
DIGITS = 3
RESERVED = ("gini", "etr", "auc", "lift", "noise_share")  # the keys besides the eval sets
PERMUTED_LABEL = " (permuted)"  # the faithfulness scores' permutation-control rows (arca.analysis.faithfulness)


def cell_names(accuracy: pd.DataFrame) -> dict[tuple[str, int], str]:
    """(method, rank) -> file stem: `<method>` when the trained cells share one rank, else `<method>-r<rank>`;
    the base model is `base`. Stable across experiments that keep the profile's ranks."""
    cells = accuracy[["method", "rank"]].drop_duplicates()
    trained = cells[cells["method"] != BASE_CELL]
    several = trained["rank"].nunique() > 1
    return {
        (str(m), int(r)): BASE_CELL if m == BASE_CELL else (f"{m}-r{int(r)}" if several else str(m))
        for m, r in cells.itertuples(index=False)
    }


def _rounded(value: float) -> float | None:
    return round(float(value), DIGITS) + 0.0 if value is not None and math.isfinite(value) else None


def _own(frame: pd.DataFrame, method: str, runs: list[str], signal_column: str = "signal") -> pd.DataFrame:
    """Rows of `runs` that score the cell's own signal (a permuted run's is its base method's)."""
    signal = method.removesuffix(PERMUTED_SUFFIX)
    return frame[frame["run"].isin(runs) & (frame[signal_column] == signal)]


def _final(frame: pd.DataFrame) -> pd.DataFrame:
    """Each run's last step in `frame`."""
    return frame[frame["step"] == frame.groupby("run")["step"].transform("max")]


def headline(
    accuracy: pd.DataFrame,
    concentration: pd.DataFrame,
    noise: pd.DataFrame,
    faithfulness: pd.DataFrame,
) -> dict[str, dict[str, float | list[float]]]:
    """Cell name -> headline metrics (keys sorted), every cell of the accuracy table.

    Args:
        accuracy: `arca.analysis.tables.accuracy_stats` rows (results/tables/accuracy.csv): grader, eval_set,
            method, rank, pass@1, pass@1_lo, pass@1_hi, runs (`;`-joined run ids).
        concentration: data/diagnostics/summary.parquet: run, step, phase, signal, over, gini_mean, etr_mean.
        noise: data/diagnostics/noise.parquet: run, phase, signal, noise_share (empty when every run is float32).
        faithfulness: data/faithfulness/*/scores.parquet: run, step, signal, auc, lift (may be empty).
    """
    missing = [c for c in ("grader", "eval_set", "method", "rank", "pass@1", "runs") if c not in accuracy.columns]
    if missing:
        raise ValueError(f"accuracy: missing columns {missing}; expected results/tables/accuracy.csv")
    rows = accuracy[accuracy["grader"] == GRADER]
    if rows.empty:
        raise ValueError(f"accuracy: no {GRADER} rows; have graders {sorted(set(accuracy['grader']))}")
    weights = concentration[(concentration["phase"] == "final") & (concentration["over"] == "weight")]
    final_noise = noise[noise["phase"] == "final"] if len(noise) else noise
    scores = faithfulness[~faithfulness["signal"].str.endswith(PERMUTED_LABEL)] if len(faithfulness) else faithfulness
    names = cell_names(rows)
    out: dict[str, dict[str, float | list[float]]] = {}
    for (method, rank), group in rows.groupby(["method", "rank"], sort=True):
        cell: dict[str, float | list[float] | None] = {}
        for _, row in group.iterrows():  # one row per eval set
            s = str(row["eval_set"])
            if s in RESERVED:
                raise ValueError(f"data.eval: an eval set may not be named {s!r} (a headline key); rename it")
            cell[s] = row["pass@1"]
            low, high = _rounded(row["pass@1_lo"]), _rounded(row["pass@1_hi"])
            if low is not None and high is not None:
                cell[f"{s}_ci"] = [low, high]
        runs = str(group["runs"].iloc[0]).split(";")
        if method != BASE_CELL:
            own = _own(weights, str(method), runs)
            if len(own):
                cell |= {"gini": own["gini_mean"].mean(), "etr": own["etr_mean"].mean()}
            if len(scores):
                scored = _final(_own(scores, str(method), runs))
                if len(scored):
                    cell |= {"auc": scored["auc"].mean(), "lift": scored["lift"].mean()}
            if len(final_noise):
                shares = _own(final_noise, str(method), runs)
                if len(shares):
                    cell["noise_share"] = shares["noise_share"].mean()
        kept = {k: v if isinstance(v, list) else _rounded(v) for k, v in sorted(cell.items())}
        out[names[(str(method), int(rank))]] = {k: v for k, v in kept.items() if v is not None}
    return dict(sorted(out.items()))
