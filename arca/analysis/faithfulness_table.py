"""The faithfulness table (SPEC 9): per signal x run x step, auc, lift and top_hit with their 95% bootstrap
intervals over completions, beside the decisive share (top_hit's chance level), each signal followed by its
permutation control. Numbers come from data/faithfulness/<run>/scores.parquet (`arca.analysis.faithfulness`);
this module only orders and formats them, without torch, for the tables stage."""

from __future__ import annotations

import math

import pandas as pd

from arca.analysis.figures import SIGNAL_ORDER  # SPEC 2 order; any other signal follows, sorted

METRICS = ("auc", "lift", "top_hit")
PERMUTED = " (permuted)"  # as arca.analysis.faithfulness.PERMUTED (not imported: that module needs torch)
FAITHFULNESS_FOOTNOTE = (
    "Counterfactual faithfulness (SPEC 9) on the probe completions of each run's dump at that checkpoint: per "
    "scored position t, r0 grades a greedy decode from y_1..y_t, r1 one from y_1..y_t-1 y'_t (y'_t the most "
    "likely other token); t is decisive iff r0 != r1. auc: P(weight at a decisive > at a non-decisive "
    "position), ties 1/2 (chance 0.5); lift: mean weight over decisive / over all scored positions (chance 1); "
    "top_hit: decisive share of the top-5% heaviest scored positions, ties at the cut in expectation (chance: "
    "decisive_share). Mean over the completions counted (both kinds of position present), with a seeded 95% "
    "bootstrap interval over completions. `<signal> (permuted)`: its weights permuted within each completion; "
    "it must sit at auc 0.5 and lift 1 within its interval, else the metric is broken, not the signal."
)


def ordered(scores: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by run, step, then signal in SPEC order, each signal directly followed by its permutation."""
    base = scores["signal"].str.removesuffix(PERMUTED)
    known = {s: i for i, s in enumerate(SIGNAL_ORDER)}
    keys = pd.DataFrame(
        {
            "run": scores["run"],
            "step": scores["step"],
            "known": base.map(known).fillna(len(known)),
            "base": base,
            "permuted": scores["signal"].str.endswith(PERMUTED),
        }
    )
    index = keys.sort_values(["run", "step", "known", "base", "permuted"], kind="stable").index
    return scores.loc[index].reset_index(drop=True)


def faithfulness_cells(scores: pd.DataFrame) -> pd.DataFrame:
    """The Markdown / LaTeX view: "value [low, high]" per metric (n/a where no completion was counted), the
    decisive share, completions counted of the total, scored and decisive positions, then lineage columns."""
    scores = ordered(scores)
    out = scores[["signal", "run", "step"]].copy()
    for metric in METRICS:
        out[metric] = [_interval(row, metric) for _, row in scores.iterrows()]
    out["decisive_share"] = [_fixed(v) for v in scores["decisive_share"]]
    out["completions"] = [f"{c}/{t}" for c, t in zip(scores["completions"], scores["completions_total"])]
    out["decisive_positions"] = [f"{d}/{p}" for d, p in zip(scores["decisive_positions"], scores["positions"])]
    lineage = [c for c in ("adapter_md5", "dump_md5") if c in scores.columns]
    return pd.concat([out, scores[lineage]], axis=1)


def _interval(row: pd.Series, metric: str) -> str:
    if math.isnan(row[metric]):
        return "n/a"
    return f"{_fixed(row[metric])} [{_fixed(row[f'{metric}_lo'])}, {_fixed(row[f'{metric}_hi'])}]"


def _fixed(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{round(float(value), 3) + 0.0:.3f}"
