"""The paper's training columns per run: whole-run means from metrics.json, spread over logged steps from log.tsv,
the train reward's interval at one observation per prompt group."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from arca.analysis.stats import wilson_interval
from arca.analysis.training_table import training_cells, training_table


def _inputs() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    metrics = pd.DataFrame(
        {
            "run": ["u", "a"],
            "method": ["uniform", "arca"],
            "rank": 8,
            "seed": 0,
            "steps": 3,
            "reward_mean": [0.25, 0.5],
            "gini_mean": [0.0, 0.3],
            "etr_mean": [1.0, 0.7],
            "fallback_rate_mean": [0.0, 1 / 3],
        }
    )
    logs = pd.DataFrame({"run": ["a"] * 3 + ["u"] * 3, "step": [1, 2, 3] * 2, "gini": [0.0, 0.4, 0.5, 0, 0, 0]}).assign(
        etr=lambda d: 1 - d["gini"]
    )
    budgets = pd.DataFrame({"run": ["a", "u"], "rollouts": 48, "generations": 8})
    return metrics, logs, budgets


def test_one_row_per_run_with_the_whole_run_means_and_their_spread():
    table = training_table(*_inputs()).set_index("run")
    assert list(table.index) == ["a", "u"]  # ordered by method
    assert table.loc["a", "gini_mean"] == 0.3 and table.loc["a", "fallback"] == pytest.approx(1 / 3)
    assert table.loc["a", "gini_sd"] == pytest.approx(pd.Series([0.0, 0.4, 0.5]).std())
    assert table.loc["u", "gini_sd"] == 0.0
    # 48 rollouts of 8 generations: 6 prompt groups, the cautious sample size
    assert (table.loc["a", "train_reward_lo"], table.loc["a", "train_reward_hi"]) == wilson_interval(3, 6)


def test_cells_read_as_the_paper_columns():
    cells = training_cells(training_table(*_inputs())).set_index("run")
    lo, hi = wilson_interval(3, 6)
    assert cells.loc["a", "train_reward"] == f"0.500 [{lo:.3f}, {hi:.3f}]"
    assert cells.loc["a", "gini"] == "0.300 ± 0.265" and cells.loc["u", "etr"] == "1.000 ± 0.000"


def test_a_run_without_reward_says_na_and_no_runs_give_an_empty_table():
    metrics, logs, budgets = _inputs()
    metrics.loc[0, "reward_mean"] = float("nan")
    cells = training_cells(training_table(metrics, logs, budgets)).set_index("run")
    assert cells.loc["u", "train_reward"] == "n/a"
    assert math.isnan(training_table(metrics, logs, budgets).set_index("run").loc["u", "train_reward_lo"])
    assert training_table(metrics.iloc[:0], logs, budgets).empty
