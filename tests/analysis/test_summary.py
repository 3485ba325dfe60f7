"""The headline metrics: one cell per method x rank with the same keys, the cell's own signal, its own runs."""

from __future__ import annotations

import pandas as pd
import pytest

from arca.analysis.summary import cell_names, headline


def _accuracy(cells: list[tuple[str, int, str]], sets=("math", "reasoning")) -> pd.DataFrame:
    rows = []
    for method, rank, runs in cells:
        for i, eval_set in enumerate(sets):
            for grader, shift in (("math_verify", 0.0), ("exact", 0.5)):
                score = 0.25 * (i + 1) + shift
                rows.append(
                    {"grader": grader, "eval_set": eval_set, "method": method, "rank": rank, "runs": runs,
                     "pass@1": score, "pass@1_lo": score - 0.1, "pass@1_hi": score + 0.1234567}
                )  # fmt: skip
    return pd.DataFrame(rows)


def _concentration(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    """(run, phase, signal, gini) -> summary.parquet rows, over weight and raw (raw must be ignored)."""
    out = []
    for run, phase, signal, gini in rows:
        for over, value in (("weight", gini), ("raw", 0.99)):
            out.append({"run": run, "step": 4, "phase": phase, "signal": signal, "over": over,
                        "gini_mean": value, "etr_mean": 1 - value})  # fmt: skip
    return pd.DataFrame(out, columns=["run", "step", "phase", "signal", "over", "gini_mean", "etr_mean"])


NO_NOISE = pd.DataFrame(columns=["run", "phase", "signal", "noise_share"])
NO_SCORES = pd.DataFrame(columns=["run", "step", "signal", "auc", "lift"])


def test_every_cell_has_the_same_keys_from_its_own_signal_and_runs():
    accuracy = _accuracy([("base", 0, "base"), ("uniform", 8, "u-r8-s0"), ("arca", 8, "a-r8-s0;a-r8-s1")])
    concentration = _concentration(
        [
            ("a-r8-s0", "final", "arca", 0.2),
            ("a-r8-s1", "final", "arca", 0.4),
            ("a-r8-s0", "final", "kl", 0.9),  # another signal on the same run: not arca's headline
            ("a-r8-s0", "init", "arca", 0.0),  # not the final checkpoint
            ("u-r8-s0", "final", "uniform", 0.0),
            ("u-r8-s0", "final", "arca", 0.7),
        ]
    )
    scores = pd.DataFrame(
        [
            {"run": "a-r8-s0", "step": 2, "signal": "arca", "auc": 0.9, "lift": 3.0},  # an earlier checkpoint
            {"run": "a-r8-s0", "step": 4, "signal": "arca", "auc": 0.6, "lift": 1.2},
            {"run": "a-r8-s0", "step": 4, "signal": "arca (permuted)", "auc": 0.5, "lift": 1.0},
            {"run": "a-r8-s0", "step": 4, "signal": "uniform", "auc": 0.5, "lift": 1.0},  # not the uniform run
        ]
    )
    cells = headline(accuracy, concentration, NO_NOISE, scores)
    assert list(cells) == ["arca", "base", "uniform"]  # one rank: no rank in the names
    assert cells["arca"] == {
        "math": 0.25, "math_ci": [0.15, 0.373], "reasoning": 0.5, "reasoning_ci": [0.4, 0.623],
        "gini": 0.3, "etr": 0.7, "auc": 0.6, "lift": 1.2,
    }  # fmt: skip
    assert cells["uniform"]["gini"] == 0.0 and cells["uniform"]["etr"] == 1.0 and "auc" not in cells["uniform"]
    assert set(cells["base"]) == {"math", "math_ci", "reasoning", "reasoning_ci"}
    assert "noise_share" not in cells["arca"]  # float32: no noise share


def test_several_ranks_name_cells_by_rank_and_low_precision_adds_the_noise_share():
    accuracy = _accuracy([("arca", 4, "a-r4-s0"), ("arca", 16, "a-r16-s0"), ("arca_perm", 16, "p-r16-s0")], ["math"])
    assert set(cell_names(accuracy).values()) == {"arca-r4", "arca-r16", "arca_perm-r16"}
    concentration = _concentration([("a-r4-s0", "final", "arca", 0.1), ("p-r16-s0", "final", "arca", 0.5)])
    noise = pd.DataFrame(
        [
            {"run": "a-r4-s0", "phase": "final", "signal": "arca", "noise_share": 0.3},
            {"run": "a-r4-s0", "phase": "init", "signal": "arca", "noise_share": 9.0},
            {"run": "a-r16-s0", "phase": "final", "signal": "kl", "noise_share": 0.8},
        ]
    )
    cells = headline(accuracy, concentration, noise, NO_SCORES)
    assert cells["arca-r4"]["noise_share"] == 0.3 and cells["arca-r4"]["gini"] == 0.1
    assert "noise_share" not in cells["arca-r16"] and "gini" not in cells["arca-r16"]  # none for its own signal
    assert cells["arca_perm-r16"]["gini"] == 0.5  # a permuted run's own signal is its method's


def test_bad_inputs_name_the_problem():
    accuracy = _accuracy([("arca", 8, "a")], ["gini"])
    with pytest.raises(ValueError, match=r"data\.eval: an eval set may not be named 'gini'"):
        headline(accuracy, _concentration([]), NO_NOISE, NO_SCORES)
    with pytest.raises(ValueError, match="no math_verify rows"):
        headline(accuracy[accuracy["grader"] == "exact"], _concentration([]), NO_NOISE, NO_SCORES)
