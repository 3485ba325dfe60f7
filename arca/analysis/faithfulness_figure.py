"""The faithfulness figure (SPEC 9): each signal's lift (mean weight on decisive tokens over the mean weight on
scored tokens, chance 1) with its 95% bootstrap interval, beside its permutation control, one panel per run x
checkpoint. Drawn from data/faithfulness/<run>/scores.parquet with the house style of `arca.analysis.figures`."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from arca.analysis.faithfulness_table import PERMUTED, ordered
from arca.analysis.figures import RC, save_png, signal_color


def faithfulness_figure(scores: pd.DataFrame, out: Path, metric: str = "lift") -> Path:
    """`metric` (default lift) per signal with its interval: filled markers for the signal, hollow ones for
    its `(permuted)` control just right of it, a dashed line at chance (lift 1; auc 0.5).

    Args:
        scores: rows of `arca.analysis.faithfulness.summarize` (signal, run, step, <metric>, _lo, _hi,
            completions) for one or more runs and steps.
        out: PNG path.
        metric: lift, auc or top_hit.
    """
    if scores.empty:
        raise ValueError("scores: no faithfulness rows to draw (no run in faithfulness.runs?)")
    scores = ordered(scores)
    panels = list(scores.groupby(["run", "step"], sort=True))
    chance = {"lift": 1.0, "auc": 0.5}.get(metric)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(max(4.0, 0.6 * scores["signal"].nunique()), 3.4 * len(panels)), layout="constrained")
        for ax, ((run, step), rows) in zip(np.atleast_1d(fig.subplots(len(panels), 1, squeeze=False)[:, 0]), panels):
            bases = list(dict.fromkeys(rows["signal"].str.removesuffix(PERMUTED)))
            for i, base in enumerate(bases):
                for offset, label, fill in ((-0.15, base, True), (0.15, base + PERMUTED, False)):
                    row = rows[rows["signal"] == label]
                    if row.empty or np.isnan(row[metric].iat[0]):
                        continue
                    value, low, high = (float(row[c].iat[0]) for c in (metric, f"{metric}_lo", f"{metric}_hi"))
                    color = signal_color(base)
                    ax.errorbar(
                        [i + offset],
                        [value],
                        yerr=[[value - low], [high - value]],
                        fmt="o",
                        color=color,
                        markerfacecolor=color if fill else "white",
                        capsize=3,
                    )
            if chance is not None:
                ax.axhline(chance, color="black", linestyle="--", linewidth=1)
            counted = int(rows["completions"].max())
            ax.set_title(f"run {run}, step {step}: {counted} completions counted", parse_math=False)
            ax.set_xticks(range(len(bases)), bases, rotation=30, ha="right")
            ax.set_ylabel(f"{metric} [95% CI]")
        handles = [
            Line2D([], [], marker="o", linestyle="", color="black", label="signal"),
            Line2D([], [], marker="o", linestyle="", color="black", markerfacecolor="white", label="permuted"),
        ]
        fig.axes[0].legend(handles=handles, loc="best")
        save_png(fig, out)
    return Path(out)


PLOT_COLUMNS = ["panel", "signal", "lift", "lift_lo", "lift_hi", "auc"]


def faithfulness_plot_table(scores: pd.DataFrame | None) -> pd.DataFrame:
    """The faithfulness figure's signals (not their permutation controls, which the PNG and table keep) as data
    for `dvc plots` (results/plots/faithfulness.csv): `panel` (run, step), signal, lift with its 95% interval,
    auc; no rows for None or no scores."""
    if scores is None or scores.empty:
        return pd.DataFrame(columns=PLOT_COLUMNS)
    rows = ordered(scores)
    rows = rows[~rows["signal"].str.endswith(PERMUTED)]
    panel = rows["run"] + " step " + rows["step"].astype(str)
    out = rows[["signal", "lift", "lift_lo", "lift_hi", "auc"]].reset_index(drop=True)
    return out.assign(panel=panel.to_numpy())[PLOT_COLUMNS]
