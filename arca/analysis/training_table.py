"""The ARCA paper's training columns per run (mean train reward, mean Gini and EffN/T over every logged step), from
each run's metrics.json and log.tsv, so a paper-profile run can stand beside PAPER.md's table without hand work.

EffN/T in the paper is `1 / (T sum_t w_t^2)` with weights summing to 1 per completion, which is our effective-token
ratio `(sum w)^2 / (T sum w^2)` (weights summing to T): the same number, so `etr` fills that column."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from arca.analysis.stats import wilson_interval

TRAINING_FOOTNOTE = (
    "Means over every logged training step (the ARCA paper's columns; EffN/T = ETR), from the weights the loss "
    "received. train_reward: mean 0/1 training reward over all rollouts with a 95% Wilson interval at the cautious "
    "sample size of one observation per prompt group (rollouts of one prompt are correlated). gini, etr: mean ± "
    "sample std over logged steps (their spread along training, not an interval). fallback: mean share of "
    "completions whose weights fell back to uniform."
)


TRAINING_COLUMNS = ("run", "method", "rank", "seed", "steps", "rollouts", "train_reward_mean", "train_reward_lo")
TRAINING_COLUMNS += ("train_reward_hi", "gini_mean", "gini_sd", "etr_mean", "etr_sd", "fallback")


def training_table(metrics: pd.DataFrame, logs: pd.DataFrame, budgets: pd.DataFrame) -> pd.DataFrame:
    """One row per run, ordered by method, rank, seed.

    Args:
        metrics: one row per run: run, method, rank, seed, steps, reward_mean, gini_mean, etr_mean,
            fallback_rate_mean (data/runs/<run>/metrics.json).
        logs: one row per run x logged step: run, step, gini, etr (data/runs/<run>/log.tsv).
        budgets: one row per run: run, rollouts, generations (data/runs/<run>/budget.json).

    Returns:
        run, method, rank, seed, steps, rollouts, train_reward (formatted with its interval), gini, etr (each
        `mean ± sd`), fallback, and the numbers behind them (`*_lo`, `*_hi`, `*_sd`) for the CSV.
    """
    rows = []
    if metrics.empty:
        return pd.DataFrame(columns=[*TRAINING_COLUMNS])
    frame = metrics.merge(budgets, on="run", how="left").sort_values(["method", "rank", "seed", "run"])
    for rec in frame.itertuples(index=False):
        steps = logs[logs["run"] == rec.run]
        groups = rec.rollouts / rec.generations
        lo, hi = _reward_interval(rec.reward_mean, groups)
        row = {"run": rec.run, "method": rec.method, "rank": int(rec.rank), "seed": int(rec.seed)}
        row |= {"steps": int(rec.steps), "rollouts": int(rec.rollouts), "train_reward_mean": rec.reward_mean}
        row |= {"train_reward_lo": lo, "train_reward_hi": hi}
        for column in ("gini", "etr"):
            row[f"{column}_mean"] = getattr(rec, f"{column}_mean")
            row[f"{column}_sd"] = _sd(steps[column].to_numpy(dtype=float))
        row["fallback"] = rec.fallback_rate_mean
        rows.append(row)
    return pd.DataFrame(rows)


def training_cells(numbers: pd.DataFrame) -> pd.DataFrame:
    """`training_table`'s numbers as the cells people read: `0.362 [0.301, 0.427]`, `0.490 ± 0.031`."""
    out = numbers[["run", "method", "rank", "seed", "steps", "rollouts"]].copy()
    out["train_reward"] = [
        f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if math.isfinite(m) else "n/a"
        for m, lo, hi in zip(numbers["train_reward_mean"], numbers["train_reward_lo"], numbers["train_reward_hi"])
    ]
    for column in ("gini", "etr"):
        out[column] = [_mean_sd(m, sd) for m, sd in zip(numbers[f"{column}_mean"], numbers[f"{column}_sd"])]
    out["fallback"] = numbers["fallback"].round(3)
    return out


def _reward_interval(mean: float, groups: float) -> tuple[float, float]:
    if not (math.isfinite(mean) and groups > 0):
        return float("nan"), float("nan")
    return wilson_interval(min(max(mean, 0.0), 1.0) * groups, groups)


def _sd(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.std(ddof=1)) if values.size >= 2 else float("nan")


def _mean_sd(mean: float, sd: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f}" if not math.isfinite(sd) else f"{mean:.3f} ± {sd:.3f}"
