"""The degeneration map's results table and figure (SPEC 10), from data/degeneration/degeneration.parquet
(`arca.analysis.degeneration`); no torch, so the tables and figures stages stay light."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from arca.analysis.figures import RC, save_png, signal_color

NOTE = (
    "Each adapter at its final checkpoint, every LoRA update scaled by c (c = 0: the reference, 1: as trained), "
    "teacher-forced on the run's own probe rollouts at that checkpoint (the tokens do not change with c). "
    "gini, etr, agnostic, fallback: trajectory means of the normalized weights (SPEC 5); kl: mean per-token "
    "exact KL(pi_c || pi_ref) in that dtype, kl32 in float32; size: sqrt(sum ||c s B A||_F^2 / sum ||W||_F^2) "
    "over the adapted modules; noise_share: ||a - a32|| / ||a32|| of the run's dtype against float32 (SPEC 2b; "
    "n/a for float32 rows), noise_dominated = yes where it is >= 1."
)


def degeneration_table(table: pd.DataFrame, lineage: pd.DataFrame) -> pd.DataFrame:
    """The results table: one row per run x signal x dtype x c, rounded, with noise_dominated and lineage.

    Args:
        table: data/degeneration/degeneration.parquet (`degeneration_rows`).
        lineage: run, adapter_md5, dump_md5.
    """
    out = table.rename(columns={"scale": "c", "agnostic_share": "agnostic", "fallback_rate": "fallback"})
    out = out.rename(columns={"update_size": "size"})
    share = out["noise_share"]
    out["noise_dominated"] = np.where(share.isna(), "n/a", np.where(share >= 1, "yes", "no"))
    cols = ["run", "signal", "dtype", "c", "kl", "kl32", "size", "gini", "etr", "agnostic", "fallback"]
    cols += ["noise_share", "rank_corr", "noise_dominated"]
    out = out[cols].copy()
    for c in ("kl", "kl32", "size"):
        out[c] = [float(f"{v:.4g}") if np.isfinite(v) else v for v in out[c]]  # spans decades: significant digits
    numeric = ["gini", "etr", "agnostic", "fallback", "noise_share", "rank_corr"]
    out[numeric] = out[numeric].round(4)
    return out.merge(lineage[["run", "adapter_md5", "dump_md5"]], on="run", how="left")


def _x_positions(kl: pd.Series, floor: float) -> np.ndarray:
    """KL on a log axis, with KL 0 (c = 0, the reference) drawn at `floor`, the axis' left edge."""
    return np.where(kl.to_numpy() > 0, kl.to_numpy(), floor)


def degeneration_figure(table: pd.DataFrame, out: Path) -> None:
    """Mean Gini of the weights against the float32 KL(pi_c || pi_ref), log x (c = 0 at the left edge, marked),
    one panel per run, one line per signal; float32 solid, the run's dtype (where it is not float32) dashed."""
    import matplotlib.pyplot as plt

    runs = sorted(table["run"].unique())
    positive = table.loc[table["kl32"] > 0, "kl32"]
    floor = float(positive.min()) / 10 if len(positive) else 1e-12
    with plt.rc_context(RC):
        cols = min(len(runs), 3)
        rows = -(-len(runs) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 2, 3.4 * rows), squeeze=False, layout="constrained")
        for ax, run in zip(axes.flat, runs):
            frame = table[table["run"] == run]
            for (signal, dtype), line in frame.groupby(["signal", "dtype"], sort=True):
                line = line.sort_values("scale")
                ax.plot(
                    _x_positions(line["kl32"], floor),
                    line["gini"],
                    color=signal_color(signal),
                    linestyle="-" if dtype == "float32" else "--",
                    marker="o",
                    markersize=2.5,
                    label=signal if dtype == "float32" else f"{signal} ({dtype})",
                )
            ax.set_xscale("log")
            ax.axvline(floor, color="#999999", linewidth=0.6)
            ax.annotate("c=0", (floor, 1.0), xycoords=("data", "axes fraction"), fontsize=7, va="top", ha="left")
            ax.set(title=run, xlabel="mean per-token KL(pi_c || pi_ref), float32", ylabel="mean Gini of weights")
            ax.set_ylim(-0.02, 1.0)
        for ax in list(axes.flat)[len(runs) :]:
            ax.set_visible(False)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", frameon=False)
        save_png(fig, out)
        plt.close(fig)


def degeneration_plot_table(table: pd.DataFrame | None) -> pd.DataFrame:
    """The degeneration figure as data for `dvc plots` (results/plots/degeneration.csv): `panel` (run, and its
    dtype where it is not float32), signal, c, `kl` = the float32 KL(pi_c || pi_ref) with c = 0 at the figure's
    left edge (a tenth of the smallest positive KL, so a log axis can hold it), and the mean Gini; no rows for
    None (no degeneration map)."""
    if table is None or table.empty:
        return pd.DataFrame(columns=["panel", "signal", "c", "kl", "gini"])
    positive = table.loc[table["kl32"] > 0, "kl32"]
    floor = float(positive.min()) / 10 if len(positive) else 1e-12
    panel = np.where(table["dtype"] == "float32", table["run"], table["run"] + " (" + table["dtype"] + ")")
    out = pd.DataFrame(
        {"panel": panel, "signal": table["signal"], "c": table["scale"], "kl": _x_positions(table["kl32"], floor)}
    )
    return out.assign(gini=table["gini"].to_numpy()).sort_values(["panel", "signal", "c"], ignore_index=True)
