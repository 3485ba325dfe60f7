"""The degeneration map (SPEC 10), tables in and tables out: per scale `c` of the adapter, the concentration of
every signal's weights on fixed probe rollouts (mean Gini, ETR, agnostic share, fallback share), the noise share
of the run's dtype against float32 (SPEC 2b), and the x-axis quantities (mean per-token exact KL of `pi_c` to
the reference, relative update size). The results table and the figure: arca.analysis.degeneration_report.

Reading it: mean normalization makes weights blind to any fixed power of `c`, so a Gini that moves with `c` at
small `c` comes from the fallback floor, the `eps` of sharpening, or precision noise, and the noise share says which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from arca.analysis.concentration import float32_signals, noise_table, trajectory_table
from arca.credit.config import CreditConfig

KEYS = ["run", "method", "rank", "seed", "step"]
# degeneration.parquet: one row per run x signal x scale x dtype.
COLUMNS = {
    **dict.fromkeys(["run", "method"], "str"),
    **dict.fromkeys(["rank", "seed", "step"], "int32"),
    "signal": "str",
    "scale": "float64",
    "dtype": "str",
    **dict.fromkeys(["trajectories", "tokens"], "int64"),
    **dict.fromkeys(["gini", "etr", "agnostic_share", "fallback_rate", "noise_share", "rank_corr"], "float64"),
    **dict.fromkeys(["kl", "kl32", "update_size"], "float64"),
}


def scale_summary(
    frame: pd.DataFrame,
    signals: Sequence[str],
    formatting_tokens: Sequence[str],
    credit: Mapping[str, CreditConfig],
    eps: float = 1e-8,
) -> pd.DataFrame:
    """One row per signal for the tokens of one run x checkpoint x scale x dtype.

    Args:
        frame: SPEC 6 rows of one run and step with `a_<s>`, `w_<s>` for every signal in that dtype, and
            `a32_<s>` (the float32 values) when the dtype is not float32.
        credit: training method -> the credit params the weights were normalized with (for the a32 weights
            `arca.analysis.concentration.noise_table` recomputes).
    Returns:
        KEYS, signal, trajectories, tokens, gini, etr, agnostic_share, fallback_rate, noise_share, rank_corr
        (NaN without a32) and kl (the `kl` signal's mean raw salience over valid tokens, NaN without it).
    """
    traj = trajectory_table(frame, signals, formatting_tokens, eps=eps)
    traj = traj[traj["over"] == "weight"]
    out = traj.groupby([*KEYS, "signal"], sort=False).agg(
        trajectories=("T", "size"),
        tokens=("T", "sum"),
        gini=("gini", "mean"),
        etr=("etr", "mean"),
        agnostic_share=("agnostic_share", "mean"),
        fallback_rate=("fallback", "mean"),
    )
    out = out.reset_index()
    out["noise_share"], out["rank_corr"] = np.nan, np.nan
    if float32_signals(frame.columns):
        noise = noise_table(frame, credit).set_index("signal")
        for column in ("noise_share", "rank_corr"):
            out[column] = out["signal"].map(noise[column]).astype(float)
    out["kl"] = float(frame["a_kl"].astype(np.float64).mean()) if "a_kl" in frame.columns else np.nan
    return out


def degeneration_rows(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The `scale_summary` rows of every run x scale x dtype (each with `scale`, `dtype`, `update_size`) as one
    table with `COLUMNS`: `kl32` is the float32 KL of the same run and scale (the x-axis every dtype shares)."""
    out = pd.concat(parts, ignore_index=True)
    kl32 = out[out["dtype"] == "float32"].groupby(["run", "scale"])["kl"].first().rename("kl32")
    out = out.merge(kl32.reset_index(), on=["run", "scale"], how="left")
    out = out[list(COLUMNS)].astype(COLUMNS)
    return out.sort_values(["run", "signal", "dtype", "scale"], kind="stable", ignore_index=True)
