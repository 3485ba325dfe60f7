"""Static figures (Lorenz curves, regime map, training curves) drawn from the dumps, diagnostics and logs.

Every figure is rendered off-screen (Agg) under fixed rc settings and written atomically, so the same
tables give byte-identical PNGs; `arca.analysis.heatmap` reuses the helpers here for the token heatmaps.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # off-screen: stages run headless and must not depend on a display

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from arca.methods import PERMUTED_SUFFIX, SIGNAL_NAMES, TABLE

log = logging.getLogger(__name__)

# SPEC section 2 order and each signal's hue, from arca.methods (the one table); any other `w_<name>` column
# found in a dump is appended after these.
SIGNAL_ORDER = SIGNAL_NAMES
_SIGNAL_COLORS = {m.name: m.color for m in TABLE if m.signal and m.color is not None}
# A permuted run's method (`arca_perm`, SPEC 3; suffix = arca.methods.PERMUTED_SUFFIX): its signal's hue, lighter.
_SIGNAL_COLORS |= {
    f"{s}{PERMUTED_SUFFIX}": mcolors.to_hex([c + (1 - c) * 0.55 for c in mcolors.to_rgb(h)])
    for s, h in _SIGNAL_COLORS.items()
}
PHASE_ORDER = ("init", "mid", "final")
TRAJECTORY_KEYS = ["run", "step", "prompt_id", "sample"]
TRAINING_COLUMNS = ["reward", "gini", "etr", "fallback_rate"]

# Fixed fonts, sizes and hash salt: the same data must give the same bytes on every machine.
RC = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "legend.fontsize": 7,
    "figure.dpi": 100,
    "savefig.dpi": 120,
    "svg.hashsalt": "arca-figures",
    "axes.grid": True,
    "grid.alpha": 0.3,
}
PNG_METADATA = {"Software": None}  # matplotlib otherwise stamps its version into the file


def atomic_write(out: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file next to `out`, then move it onto `out` in one step.

    Args:
        out: final path; its parent directory is created if missing.
        write: writes the whole content to the path it is given.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_png(fig: Figure, out: Path) -> None:
    """Write `fig` as a deterministic PNG at `out` (atomically)."""
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", metadata=PNG_METADATA))


def signals_in(df: pd.DataFrame) -> list[str]:
    """Signal names with a `w_<name>` column in `df`, SPEC order first, then any others sorted."""
    found = {c[2:] for c in df.columns if c.startswith("w_")}
    return [s for s in SIGNAL_ORDER if s in found] + sorted(found - set(SIGNAL_ORDER))


def signal_color(signal: str) -> str:
    """A fixed color per signal, the same in every figure."""
    if signal in _SIGNAL_COLORS:
        return _SIGNAL_COLORS[signal]
    extra = list(mcolors.TABLEAU_COLORS.values())
    return extra[sum(map(ord, signal)) % len(extra)]  # stable across processes, unlike hash()


def _require(df: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing columns {missing}; have {list(df.columns)}")


def _ordered(values: Sequence, order: Sequence) -> list:
    """Unique `values`, those in `order` first (in that order), then the rest sorted."""
    uniq = set(values)
    return [v for v in order if v in uniq] + sorted(uniq - set(order), key=str)


def lorenz_on_grid(traj_codes: np.ndarray, weights: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz curve of every trajectory, evaluated on a common grid, and each trajectory's Gini (SPEC 5).

    A trajectory's curve joins the points (i / T, share of weight on its i lightest tokens) linearly; a
    trajectory with zero total weight counts as uniform (its curve is the diagonal, Gini 0).

    Args:
        traj_codes: (N,) int trajectory index in [0, G) for every token, every index present.
        weights: (N,) float weights w >= 0.
        grid: (P,) token shares in [0, 1].

    Returns:
        curves (G, P) credit share held by the lightest `grid` share of tokens, and gini (G,).
    """
    order = np.lexsort((weights, traj_codes))  # by trajectory, then ascending weight
    w = weights[order].astype(np.float64)  # (N,)
    lengths = np.bincount(traj_codes)  # (G,)
    start = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # (G,)
    rank = np.arange(w.size) - np.repeat(start, lengths)  # (N,) 0-based rank within trajectory
    cum = np.cumsum(w)  # (N,)
    cum_within = cum - np.repeat(cum[start] - w[start], lengths)  # (N,) running sum inside trajectory
    total = cum_within[start + lengths - 1]  # (G,)
    codes = np.repeat(np.arange(lengths.size), lengths)  # (N,) codes in sorted order
    weighted_rank = np.bincount(codes, weights=(rank + 1) * w, minlength=lengths.size)  # (G,)
    safe_total = np.where(total > 0, total, 1.0)
    gini = 2 * weighted_rank / (lengths * safe_total) - (lengths + 1) / lengths  # (G,)
    gini = np.where((total > 0) & (lengths > 1), gini, 0.0)

    pos = grid[None, :] * lengths[:, None]  # (G, P) fractional number of tokens
    k = np.minimum(np.floor(pos).astype(np.int64), lengths[:, None] - 1)  # (G, P) next token to add
    below = np.where(k > 0, cum_within[start[:, None] + k - 1], 0.0)  # (G, P) weight of the k lightest
    curves = (below + (pos - k) * w[start[:, None] + k]) / safe_total[:, None]  # (G, P)
    curves = np.where(total[:, None] > 0, curves, grid[None, :])
    return np.clip(curves, 0.0, 1.0), gini


def phases_from_steps(dumps: pd.DataFrame) -> pd.DataFrame:
    """Phase of every (run, step): the first checkpoint of a run is "init", the last "final", others "mid".

    Used when the diagnostics' own phase table is not given; a run with one checkpoint is "final" unless
    that checkpoint is step 0.
    """
    pairs = dumps[["run", "step"]].drop_duplicates()
    first = pairs.groupby("run")["step"].transform("min")
    last = pairs.groupby("run")["step"].transform("max")
    phase = np.where(pairs["step"] == last, "final", np.where(pairs["step"] == first, "init", "mid"))
    phase = np.where((first == last) & (pairs["step"] == 0), "init", phase)
    return pairs.assign(phase=phase).reset_index(drop=True)


def _lorenz_panels(dumps: pd.DataFrame, by: str, phases: pd.DataFrame | None) -> list[tuple[str, pd.DataFrame]]:
    """Split the dump rows into (title, rows) panels: by rank (each run's final checkpoint) or by phase."""
    if by == "rank":
        final = dumps.groupby("run")["step"].transform("max")
        rows = dumps[dumps["step"] == final]
        return [(f"rank {r} (final checkpoint)", rows[rows["rank"] == r]) for r in sorted(rows["rank"].unique())]
    if by == "phase":
        table = phases if phases is not None else phases_from_steps(dumps)
        _require(table, ["run", "step", "phase"], "phases")
        table = table[["run", "step", "phase"]].drop_duplicates(["run", "step"])
        rows = dumps.merge(table, on=["run", "step"], how="inner", validate="many_to_one")
        return [(f"phase {p}", rows[rows["phase"] == p]) for p in _ordered(rows["phase"], PHASE_ORDER)]
    raise ValueError(f"by: must be 'rank' or 'phase', got {by!r}")


def lorenz_figure(
    dumps: pd.DataFrame, out: Path, by: str = "phase", phases: pd.DataFrame | None = None, grid_points: int = 201
) -> Path:
    """Lorenz curves of the normalized token weights per signal, one panel per rank or phase.

    Aggregation: each trajectory's Lorenz curve is evaluated on a common grid of token shares and the
    curves are averaged with equal weight per trajectory (long completions do not dominate). The legend
    gives the mean per-trajectory Gini (SPEC 5), which equals 1 - 2 x the area under the averaged curve.
    The uniform signal is the diagonal and is drawn as such.

    Args:
        dumps: token rows with `run, rank, step, prompt_id, sample` and `w_<signal>` columns (SPEC 6).
        out: PNG path.
        by: "rank" (one panel per LoRA rank, each run's final checkpoint) or "phase" (init / mid / final).
        phases: optional table `run, step, phase` (e.g. from the diagnostics); derived from steps if None.
        grid_points: number of token-share grid points in [0, 1].
    """
    _require(dumps, [*TRAJECTORY_KEYS, "rank"], "dumps")
    signals = [s for s in signals_in(dumps) if s != "uniform"]
    if not signals:
        raise ValueError("dumps: no non-uniform w_<signal> columns to draw")
    panels = [(t, rows) for t, rows in _lorenz_panels(dumps, by, phases) if len(rows)]
    if not panels:
        raise ValueError("dumps: no rows left to draw (empty table, or no step matches `phases`)")
    grid = np.linspace(0.0, 1.0, grid_points)  # (P,)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(3.4 * len(panels), 3.6), layout="constrained")
        for ax, (title, rows) in zip(np.atleast_1d(fig.subplots(1, len(panels), sharey=True)), panels):
            codes = rows.groupby(TRAJECTORY_KEYS, sort=True, observed=True).ngroup().to_numpy()  # (N,)
            ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="uniform (G=0.00)")
            for signal in signals:
                curves, gini = lorenz_on_grid(codes, rows[f"w_{signal}"].to_numpy(), grid)
                ax.plot(
                    grid,
                    curves.mean(axis=0),
                    color=signal_color(signal),
                    linewidth=1.5,
                    label=f"{signal} (G={gini.mean():.2f})",
                )
            ax.set_title(f"{title}, n={codes.max() + 1} traj.")
            ax.set_xlabel("share of tokens (lightest first)")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_aspect("equal")
            ax.legend(loc="upper left")
        fig.axes[0].set_ylabel("share of credit (normalized weight)")
        save_png(fig, out)
    return Path(out)


def regime_map(
    traj: pd.DataFrame,
    out: Path,
    etr_uniform: float,
    etr_concentrated: float,
    over: str = "weight",
    max_points: int = 5000,
    seed: int = 0,
) -> Path:
    """ETR vs Gini scatter, one point per trajectory and signal, over the regime bands of SPEC 5.

    One panel per phase. Points are drawn in a seeded random order (so no signal hides the others by
    being drawn last) and at most `max_points` per panel are kept, a seeded sample.

    Args:
        traj: per-trajectory diagnostics with `phase, signal, over, gini, etr`.
        out: PNG path.
        etr_uniform: ETR at or above which a trajectory is "uniform" (params diagnostics.etr_uniform).
        etr_concentrated: ETR at or below which it is "concentrated" (diagnostics.etr_concentrated).
        over: which diagnostics to draw, "weight" (normalized w) or "raw" (salience a).
        max_points: cap on points per panel.
        seed: seed of the sampling and drawing order.
    """
    if not 0.0 <= etr_concentrated < etr_uniform <= 1.0:
        raise ValueError(f"etr_concentrated, etr_uniform: need 0 <= {etr_concentrated} < {etr_uniform} <= 1")
    _require(traj, ["phase", "signal", "over", "gini", "etr"], "traj")
    rows = traj[traj["over"] == over]
    if rows.empty:
        raise ValueError(f"over: no trajectories with over == {over!r}; have {sorted(traj['over'].unique())}")
    phases = _ordered(rows["phase"], PHASE_ORDER)
    signals = _ordered(rows["signal"], SIGNAL_ORDER)
    rng = np.random.default_rng(seed)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(3.6 * len(phases), 3.8), layout="constrained")
        for ax, phase in zip(np.atleast_1d(fig.subplots(1, len(phases), sharey=True)), phases):
            panel = rows[rows["phase"] == phase].sort_values(["signal", *TRAJECTORY_KEYS], kind="stable")
            pick = rng.permutation(len(panel))[:max_points]  # seeded: sample and z-order in one draw
            shown = panel.iloc[pick]
            ax.axhspan(etr_uniform, 1.0, color="#2ca02c", alpha=0.12, linewidth=0)
            ax.axhspan(0.0, etr_concentrated, color="#d62728", alpha=0.12, linewidth=0)
            for y, text in (
                (1.0, "uniform"),
                ((etr_uniform + etr_concentrated) / 2, "middle"),
                (etr_concentrated, "concentrated"),
            ):
                ax.text(
                    0.98,
                    y,
                    text,
                    ha="right",
                    va="top" if y >= etr_uniform else "center",
                    fontsize=7,
                    color="dimgray",
                    transform=ax.get_yaxis_transform(),
                )
            ax.scatter(
                shown["gini"], shown["etr"], s=6, alpha=0.6, linewidths=0, c=[signal_color(s) for s in shown["signal"]]
            )
            ax.set_title(f"phase {phase} ({len(shown)} of {len(panel)} points)")
            ax.set_xlabel(f"Gini over {over}")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
        fig.axes[0].set_ylabel(f"effective-token ratio (ETR) over {over}")
        handles = [Line2D([], [], marker="o", linestyle="", color=signal_color(s), label=s) for s in signals]
        fig.axes[-1].legend(handles=handles, loc="lower left")
        save_png(fig, out)
    return Path(out)


_TRAINING_YLABELS = {
    "reward": "train accuracy (mean 0/1 reward)",
    "gini": "Gini of the run's weights",
    "etr": "ETR of the run's weights",
    "fallback_rate": "fallback rate",
}


def training_table(logs: pd.DataFrame) -> pd.DataFrame:
    """Long table `run, method, rank, seed, step, reward, gini, etr, fallback_rate`, sorted by run, step.

    Optional metric columns missing from `logs` come back as NaN, so every run has the same columns.
    """
    _require(logs, ["run", "method", "step"], "logs")
    table = logs.copy()
    for column in ["rank", "seed", *TRAINING_COLUMNS]:
        if column not in table.columns:
            table[column] = np.nan
    table = table[["run", "method", "rank", "seed", "step", *TRAINING_COLUMNS]]
    return table.sort_values(["run", "step"], kind="stable").reset_index(drop=True)


def training_curves(
    logs: pd.DataFrame, out_png: Path, out_csv: Path, evals: pd.DataFrame | None = None
) -> tuple[Path, Path]:
    """Reward (= train accuracy), Gini, ETR and fallback rate over steps: a PNG and a CSV for `dvc plots`.

    The PNG draws one line per (method, rank): the mean over seeds, with the seeds' min-max range shaded.
    Held-out pass@1 from `evals` (if given) is marked at each group's last step in the accuracy panel.

    Args:
        logs: rows `run, method, step` plus any of `rank, seed, reward, gini, etr, fallback_rate`.
        out_png: PNG path.
        out_csv: CSV path (long table, one row per run and step; see `training_table`).
        evals: optional rows `run, pass@1`.
    """
    table = training_table(logs)
    atomic_write(out_csv, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n"))
    styles = ["-", "--", ":", "-."]
    ranks = sorted(table["rank"].dropna().unique())
    groups = table.groupby(["method", "rank"], dropna=False, sort=True)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(10, 6.5), layout="constrained")
        for ax, metric in zip(fig.subplots(2, 2, sharex=True).ravel(), TRAINING_COLUMNS):
            for (method, rank), rows in groups:
                per_step = rows.groupby("step")[metric].agg(["mean", "min", "max"])
                style = styles[ranks.index(rank) % len(styles)] if rank in ranks else "-"
                seeds = rows["run"].nunique()
                label = f"{method} r={rank:g}" if pd.notna(rank) else str(method)
                label += f" ({seeds} run{'s' if seeds > 1 else ''})"
                ax.plot(per_step.index, per_step["mean"], color=signal_color(method), linestyle=style, label=label)
                color = signal_color(method)
                ax.fill_between(per_step.index, per_step["min"], per_step["max"], color=color, alpha=0.15, linewidth=0)
            if table[metric].isna().all():
                ax.text(0.5, 0.5, f"no {metric} in the logs", ha="center", va="center", transform=ax.transAxes)
            ax.set_ylabel(_TRAINING_YLABELS[metric])
            ax.set_title(metric)
        axes = fig.axes
        if evals is not None and len(evals):
            _mark_pass_at_1(axes[0], table, evals)
        axes[2].set_xlabel("step")
        axes[3].set_xlabel("step")
        axes[0].legend(loc="best")
        save_png(fig, out_png)
    return Path(out_png), Path(out_csv)


def _mark_pass_at_1(ax, table: pd.DataFrame, evals: pd.DataFrame) -> None:
    """Star at each (method, rank)'s last step at the mean held-out pass@1 of its runs."""
    _require(evals, ["run", "pass@1"], "evals")
    last = table.groupby("run").agg(method=("method", "first"), rank=("rank", "first"), step=("step", "max"))
    joined = last.join(evals.set_index("run")["pass@1"], how="inner")
    for (method, _), rows in joined.groupby(["method", "rank"], dropna=False, sort=True):
        ax.plot(
            rows["step"].max(),
            rows["pass@1"].mean(),
            marker="*",
            markersize=10,
            linestyle="",
            color=signal_color(method),
            markeredgecolor="black",
            markeredgewidth=0.5,
        )
    ax.plot([], [], marker="*", linestyle="", color="gray", label="held-out pass@1 (eval)")


def lorenz_table(
    dumps: pd.DataFrame, by: str = "phase", phases: pd.DataFrame | None = None, grid_points: int = 21
) -> pd.DataFrame:
    """The Lorenz curves of `lorenz_figure` as data for `dvc plots` (results/plots/lorenz.csv): one row per panel
    x signal x grid point, `panel, panel_order` (the figure's panel order), `signal, token_share, credit_share`,
    the mean over trajectories as drawn; `uniform` is the diagonal. A coarser grid than the PNG's (21 points):
    enough to overlay experiments."""
    _require(dumps, [*TRAJECTORY_KEYS, "rank"], "dumps")
    grid = np.linspace(0.0, 1.0, grid_points)  # (P,)
    parts = []
    for order, (title, rows) in enumerate(_lorenz_panels(dumps, by, phases)):
        if rows.empty:
            continue
        codes = rows.groupby(TRAJECTORY_KEYS, sort=True, observed=True).ngroup().to_numpy()  # (N,)
        for signal in signals_in(rows):
            curves, _ = lorenz_on_grid(codes, rows[f"w_{signal}"].to_numpy(), grid)
            parts.append(
                pd.DataFrame(
                    {
                        "panel": title,
                        "panel_order": order,
                        "signal": signal,
                        "token_share": grid,
                        "credit_share": curves.mean(axis=0),
                    }
                )
            )
    if not parts:
        raise ValueError("dumps: no rows left to tabulate (empty table, or no step matches `phases`)")
    return pd.concat(parts, ignore_index=True)
