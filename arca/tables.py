"""Results tables (accuracy, concentration, signal agreement, precision noise) with lineage on every row,
rendered as Markdown, CSV and LaTeX (booktabs)."""

from __future__ import annotations

import math

import pandas as pd

CONCENTRATION_METRICS = ("gini", "etr", "top_k_mass", "agnostic_share")
NOISE_FOOTNOTE = (
    "noise_share: L2 norm of a - a32 over the L2 norm of a32, where a is the salience in the run's dtype and "
    "a32 its float32 recomputation on the same probe tokens and checkpoint (SPEC 2b); noise_dominated = yes "
    "where it is >= 1 (the salience is mostly rounding noise); n/a: not recomputed in float32 (a float32 run, "
    "or a signal that needs no float32 check)."
)
NO_LOW_PRECISION = (
    "No low-precision run: every dump is float32, so there is no float32 recomputation (a32_ columns) to "
    "compare with and no precision noise to report (SPEC 2b)."
)


def _mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.3f} ± {std:.3f}"


def accuracy_table(evals: pd.DataFrame, budgets: pd.DataFrame, lineage: pd.DataFrame) -> pd.DataFrame:
    """One row per method x rank: mean ± std over seeds of every eval set's pass@1 and mean@k, the rollout
    budget, and lineage (run ids, adapter md5s).

    Args:
        evals: run, method, rank, seed, eval_set, pass@1, mean@k (long: one row per run x eval set).
        budgets: run, rollouts, generated_tokens.
        lineage: run, adapter_md5.
    """
    frame = evals.merge(budgets, on="run", how="left").merge(lineage, on="run", how="left")
    rows = []
    for (method, rank), group in frame.groupby(["method", "rank"], sort=True):
        row: dict[str, object] = {"method": method, "rank": int(rank), "seeds": group["seed"].nunique()}
        for eval_set, part in group.groupby("eval_set", sort=True):
            row[f"{eval_set} pass@1"] = _mean_std(part["pass@1"])
            row[f"{eval_set} mean@k"] = _mean_std(part["mean@k"])
        per_run = group.drop_duplicates("run").sort_values("run")
        row["rollouts"] = _int_or_na(per_run["rollouts"].mean())
        row["generated_tokens"] = _int_or_na(per_run["generated_tokens"].mean())
        row["runs"] = ";".join(per_run["run"])
        row["adapter_md5"] = ";".join(per_run["adapter_md5"].fillna("none"))
        rows.append(row)
    return pd.DataFrame(rows)


def concentration_table(
    summary: pd.DataFrame, lineage: pd.DataFrame, noise: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per signal x rank x phase over normalized weights: mean over runs of the per-run trajectory
    means (Gini, ETR, top-5% mass, agnostic share), regime fractions and fallback rate, with lineage.

    With a non-empty `noise` (data/diagnostics/noise.parquet), two more columns mark noise-dominated signals:
    `noise_share` (mean over runs x checkpoints) and `noise_dominated` (yes / no / n/a, see NOISE_FOOTNOTE).
    """
    frame = summary[summary["over"] == "weight"].merge(lineage, on="run", how="left")
    agg = {f"{m}_mean": "mean" for m in CONCENTRATION_METRICS}
    agg |= {"frac_uniform": "mean", "frac_middle": "mean", "frac_concentrated": "mean", "fallback_rate": "mean"}
    out = frame.groupby(["signal", "rank", "phase"], sort=True).agg(agg).round(4).reset_index()
    out = out.rename(columns={f"{m}_mean": m for m in CONCENTRATION_METRICS})
    out = out.rename(columns={"top_k_mass": "top5%_mass"})
    if noise is not None and not noise.empty:
        share = noise.groupby(["signal", "rank", "phase"], sort=True)["noise_share"].mean().rename("noise_share")
        out = out.merge(share.reset_index(), on=["signal", "rank", "phase"], how="left")
        out["noise_share"] = out["noise_share"].round(4)
        out["noise_dominated"] = _dominated(out["noise_share"])
    lin = frame.groupby(["signal", "rank", "phase"], sort=True).apply(_lineage_cols, include_groups=False)
    return out.merge(lin.reset_index(), on=["signal", "rank", "phase"])


def noise_summary_table(noise: pd.DataFrame, lineage: pd.DataFrame) -> pd.DataFrame:
    """One row per signal x rank x phase of the low-precision runs: mean over runs x checkpoints of the noise
    share and rank correlation against float32 (SPEC 2b), how many of those checkpoints are noise-dominated,
    and the mean Gini / ETR of the weights from the run-dtype saliences next to those from the float32 ones,
    with lineage. Empty when `noise` is (every run is float32: write NO_LOW_PRECISION instead).

    Args:
        noise: data/diagnostics/noise.parquet (`arca.concentration.noise_table`).
        lineage: run, dump_md5.
    """
    keys = ["signal", "rank", "phase"]
    frame = noise.merge(lineage, on="run", how="left")
    out = frame.groupby(keys, sort=True).agg(
        checkpoints=("step", "size"),
        dominated_checkpoints=("noise_dominated", "sum"),  # the mean can hide one noisy run
        noise_share=("noise_share", "mean"),
        rank_corr=("rank_corr", "mean"),
        gini=("gini", "mean"),
        gini_fp32=("gini32", "mean"),
        etr=("etr", "mean"),
        etr_fp32=("etr32", "mean"),
    )
    out = out.round(4).reset_index()
    out["noise_dominated"] = _dominated(out["noise_share"])
    if out.empty:
        return out.reindex(columns=[*out.columns, "runs", "dump_md5"])
    lin = frame.groupby(keys, sort=True).apply(_lineage_cols, include_groups=False)
    return out.merge(lin.reset_index(), on=keys)


def _dominated(share: pd.Series) -> pd.Series:
    """yes / no by SPEC 2b's rule (noise share >= 1), n/a where the share was not measured."""
    return pd.Series(
        ["n/a" if math.isnan(s) else "yes" if s >= 1 else "no" for s in share], index=share.index, dtype=object
    )


def agreement_table(agreement: pd.DataFrame, summary: pd.DataFrame, lineage: pd.DataFrame) -> pd.DataFrame:
    """Mean Spearman correlation of weights per signal pair x phase, over runs, with lineage."""
    phases = summary[["run", "step", "phase"]].drop_duplicates()
    frame = agreement.merge(phases, on=["run", "step"]).merge(lineage, on="run", how="left")
    keys = ["signal_a", "signal_b", "phase"]
    out = frame.groupby(keys, sort=True).agg(spearman=("spearman_mean", "mean"), trajectories=("n", "sum"))
    lin = frame.groupby(keys, sort=True).apply(_lineage_cols, include_groups=False)
    return out.round(4).reset_index().merge(lin.reset_index(), on=keys)


def _lineage_cols(group: pd.DataFrame) -> pd.Series:
    per_run = group.drop_duplicates("run").sort_values("run")
    return pd.Series({"runs": ";".join(per_run["run"]), "dump_md5": ";".join(per_run["dump_md5"].fillna("none"))})


def _int_or_na(value: float) -> object:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def to_markdown(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def to_latex(df: pd.DataFrame, caption: str, note: str | None = None) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); lineage columns are left to the CSV. `note` is set
    in small type under the tabular (a footnote, or the one line that replaces an empty table)."""
    shown = df[[c for c in df.columns if c not in ("runs", "adapter_md5", "dump_md5", "git_rev")]]
    cols = "l" * len(shown.columns)
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{_tex(caption)}}}",
        f"\\begin{{tabular}}{{{cols}}}",
        "\\toprule",
        " & ".join(_tex(str(c)) for c in shown.columns) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(_tex(_cell(v)) for v in row) + " \\\\" for row in shown.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}"]
    if note:
        lines.append(f"\\par\\smallskip{{\\footnotesize {_tex(note)}}}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _tex(text: str) -> str:
    for old, new in (
        ("\\", "\\textbackslash{}"),
        ("&", "\\&"),
        ("%", "\\%"),
        ("_", "\\_"),
        ("#", "\\#"),
        ("±", "$\\pm$"),
        ("@", "@"),
    ):
        text = text.replace(old, new)
    return text
