"""Token heatmaps: self-contained HTML pages (one per probe prompt) and a static PNG of a few of them.

Each page shows one completion, token by token, with one row per signal colored by its normalized weight
on a log scale (red: more than the mean credit, blue: less), so a reader sees which tokens each signal
credits. Token text is always HTML-escaped and whitespace made visible.
"""

from __future__ import annotations

import html
import logging
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from arca.analysis.explorer import visible_token  # one rule for both pages
from arca.analysis.figures import RC, atomic_write, lorenz_on_grid, save_png, signals_in

log = logging.getLogger(__name__)

LOG2_RANGE = 3.0  # colors saturate at 8x above / below the mean weight
TOKENS_PER_BLOCK = 16  # columns per aligned block on a page
_CMAP = "RdBu_r"
# Counterfactual marks (SPEC 9): a box on decisive tokens, a dotted underline on scored, non-decisive ones.
_DECISIVE_STYLE = {True: ";outline:2px solid #000;outline-offset:-2px", False: ";border-bottom:2px dotted #555"}
_DECISIVE_LEGEND = (
    "<p>Counterfactual test (SPEC 9): <span style='outline:2px solid #000'>boxed</span> tokens are decisive "
    "(replacing the token by the most likely other one and decoding greedily changes the reward), "
    "<span style='border-bottom:2px dotted #555'>dotted</span> ones were scored and are not; others were not "
    "scored.</p>"
)


@dataclass(frozen=True)
class Completion:
    """One chosen completion: its token rows (sorted by pos) and where it came from."""

    prompt_id: str
    sample: int
    rows: pd.DataFrame


def page_name(prompt_id: str) -> str:
    """A safe file name for a prompt's page: unsafe characters replaced, plus a checksum if anything was."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", prompt_id).strip("._") or "prompt"
    if safe != prompt_id:
        safe = f"{safe}-{zlib.crc32(prompt_id.encode()):08x}"  # keeps distinct ids distinct
    return f"{safe}.html"


def log2_weight(w: np.ndarray) -> np.ndarray:
    """log2 of the weights clipped to +-LOG2_RANGE (w = 0 maps to the bottom). Shape preserved."""
    with np.errstate(divide="ignore"):
        return np.clip(np.log2(np.asarray(w, dtype=np.float64)), -LOG2_RANGE, LOG2_RANGE)


def weight_colors(w: np.ndarray) -> tuple[list[str], list[str]]:
    """Background and text colors (hex) for weights `w` (T,): white at the mean weight 1."""
    level = (log2_weight(w) + LOG2_RANGE) / (2 * LOG2_RANGE)  # (T,) in [0, 1]
    rgba = matplotlib.colormaps[_CMAP](level)  # (T, 4)
    background = [matplotlib.colors.to_hex(c) for c in rgba]
    text = ["#ffffff" if abs(x - 0.5) > 0.33 else "#000000" for x in level]
    return background, text


def choose_completions(
    dumps: pd.DataFrame, run: str, step: int | None, max_prompts: int, seed: int
) -> tuple[int, list[Completion]]:
    """Seeded choice of up to `max_prompts` prompts of `run` at `step` (default: its last), one sample each.

    Returns:
        the step used, and the chosen completions in prompt_id order.
    """
    if max_prompts < 1:
        raise ValueError(f"max_prompts: must be >= 1, got {max_prompts}")
    runs = sorted(dumps["run"].unique())
    if run not in runs:
        raise ValueError(f"run: {run!r} not in the dumps; have {runs}")
    rows = dumps[dumps["run"] == run]
    step = int(rows["step"].max()) if step is None else int(step)
    rows = rows[rows["step"] == step]
    if rows.empty:
        raise ValueError(f"step: run {run!r} has no checkpoint {step}; have {sorted(dumps['step'].unique())}")
    rng = np.random.default_rng(seed)
    prompts = sorted(rows["prompt_id"].unique())
    chosen = sorted(rng.choice(prompts, size=min(max_prompts, len(prompts)), replace=False).tolist())
    completions = []
    for prompt_id in chosen:
        of_prompt = rows[rows["prompt_id"] == prompt_id]
        sample = int(rng.choice(sorted(of_prompt["sample"].unique())))
        picked = of_prompt[of_prompt["sample"] == sample].sort_values("pos")
        completions.append(Completion(prompt_id, sample, picked.reset_index(drop=True)))
    return step, completions


def with_effects(completions: list[Completion], run: str, step: int, effects: pd.DataFrame | None) -> list[Completion]:
    """The completions with a `decisive` column (True / False at scored positions, None elsewhere) when
    `effects` holds rows of `run` at `step`; unchanged otherwise."""
    if effects is None:
        return completions
    effects = effects[(effects["run"] == run) & (effects["step"] == step)]
    if effects.empty:
        return completions
    keys = ["prompt_id", "sample", "pos"]
    out = []
    for c in completions:
        rows = c.rows.drop(columns=["decisive"], errors="ignore").merge(
            effects[[*keys, "decisive"]], on=keys, how="left", validate="one_to_one"
        )
        rows["decisive"] = rows["decisive"].astype(object).where(rows["decisive"].notna(), None)
        out.append(Completion(c.prompt_id, c.sample, rows))
    return out


_CSS = """
body { font-family: "DejaVu Sans", sans-serif; font-size: 13px; margin: 1.5em; color: #222; }
table.tok { border-collapse: collapse; margin: 0 0 0.8em 0; }
table.tok td { padding: 2px 3px; border: 1px solid #eee; font-family: "DejaVu Sans Mono", monospace;
  white-space: pre; text-align: center; min-width: 1.2em; }
table.tok th { text-align: right; padding-right: 0.6em; font-weight: normal; color: #555; white-space: nowrap; }
td.pos { color: #999; font-size: 10px; border: none; }
.meta td { padding: 1px 1em 1px 0; }
.scale span { display: inline-block; padding: 2px 6px; font-family: monospace; }
"""


def _scale_html() -> str:
    """A legend strip: the colors of w = 0, 1/8 .. 8."""
    ws = np.array([0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    bg, fg = weight_colors(ws)
    cells = "".join(f'<span style="background:{b};color:{f}">w={w:g}</span>' for w, b, f in zip(ws, bg, fg))
    return f'<p class="scale">normalized weight (mean 1, log scale): {cells}</p>'


def _block_html(rows: pd.DataFrame, signals: list[str], stats: dict[str, str]) -> str:
    """One aligned block: a position row, then one row per signal with every token colored by its weight."""
    tokens = [html.escape(visible_token(t), quote=True) for t in rows["token"].astype(str)]
    # SPEC 9 marks, where the faithfulness stage scored this completion: True / False / None (not scored)
    decisive = rows["decisive"].tolist() if "decisive" in rows else [None] * len(rows)
    lines = ["<table class='tok'>", "<tr><th></th>"]
    lines += [f'<td class="pos">{p}</td>' for p in rows["pos"]]
    lines.append("</tr>")
    for signal in signals:
        w = rows[f"w_{signal}"].to_numpy()
        a = rows[f"a_{signal}"].to_numpy() if f"a_{signal}" in rows else np.full(len(rows), np.nan)
        bg, fg = weight_colors(w)
        lines.append(f"<tr><th>{html.escape(signal)} {stats[signal]}</th>")
        for i, token in enumerate(tokens):
            title = html.escape(
                f"pos {rows['pos'].iat[i]} id {rows['token_id'].iat[i]} | {signal}: w={w[i]:.4g} a={a[i]:.4g}",
                quote=True,
            )
            mark = _DECISIVE_STYLE.get(decisive[i], "")
            lines.append(f'<td style="background:{bg[i]};color:{fg[i]}{mark}" title="{title}">{token}</td>')
        lines.append("</tr>")
    lines.append("</table>")
    return "".join(lines)


def _signal_stats(rows: pd.DataFrame, signals: list[str]) -> dict[str, str]:
    """`G=.. ETR=..` of this completion's weights per signal (SPEC 5), for the row headers."""
    out = {}
    codes = np.zeros(len(rows), dtype=np.int64)
    for signal in signals:
        w = rows[f"w_{signal}"].to_numpy(dtype=np.float64)  # (T,)
        _, gini = lorenz_on_grid(codes, w, np.array([0.0]))
        etr = w.sum() ** 2 / (len(w) * (w**2).sum()) if (w**2).sum() > 0 else 1.0
        out[signal] = f"(G={gini[0]:.2f} ETR={etr:.2f})"
    return out


def completion_page(completion: Completion, step: int) -> str:
    """The whole HTML page of one completion (inline CSS, no scripts, no external resources)."""
    rows, signals = completion.rows, signals_in(completion.rows)
    first = rows.iloc[0]
    meta = {
        "run": first["run"],
        "method": first.get("method", ""),
        "rank": first.get("rank", ""),
        "seed": first.get("seed", ""),
        "step": step,
        "prompt_id": completion.prompt_id,
        "sample": completion.sample,
        "reward": f"{float(first['reward']):.3g}",
        "advantage": f"{float(first.get('advantage', np.nan)):.3g}",
        "tokens": len(rows),
    }
    meta_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items())
    stats = _signal_stats(rows, signals)
    blocks = [
        _block_html(rows.iloc[i : i + TOKENS_PER_BLOCK], signals, stats) for i in range(0, len(rows), TOKENS_PER_BLOCK)
    ]
    title = html.escape(f"{meta['run']} / {completion.prompt_id}")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{title}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{title}</h1>",
            f"<table class='meta'>{meta_rows}</table>",
            _scale_html(),
            "<p>Whitespace: \u00b7 space, \u23ce newline, \u21e5 tab. Hover a token for its values.</p>",
            _DECISIVE_LEGEND if "decisive" in rows else "",
            *blocks,
            '<p><a href="index.html">all prompts</a></p>',
            "</body></html>",
            "",
        ]
    )


def index_page(run: str, step: int, completions: list[Completion]) -> str:
    """The index page linking every prompt page, with its reward and length."""
    items = "".join(
        f'<tr><td><a href="{html.escape(page_name(c.prompt_id), quote=True)}">{html.escape(c.prompt_id)}</a>'
        f"</td><td>{c.sample}</td><td>{float(c.rows['reward'].iat[0]):.3g}</td><td>{len(c.rows)}</td></tr>"
        for c in completions
    )
    head = "<tr><th>prompt</th><th>sample</th><th>reward</th><th>tokens</th></tr>"
    title = html.escape(f"Token heatmaps: run {run}, step {step}")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{title}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{title}</h1>",
            _scale_html(),
            f"<table class='meta'>{head}{items}</table>",
            "</body></html>",
            "",
        ]
    )


def heatmap_pages(
    dumps: pd.DataFrame,
    out_dir: Path,
    run: str,
    step: int | None = None,
    max_prompts: int = 8,
    seed: int = 0,
    effects: pd.DataFrame | None = None,
) -> list[Path]:
    """Write `index.html` and one page per chosen prompt of `run` into `out_dir`; remove stale pages.

    Args:
        dumps: token rows (SPEC 6) with at least `run, step, prompt_id, sample, pos, token_id, token,
            reward` and `w_<signal>` columns (`a_<signal>` shown on hover when present).
        out_dir: directory of the pages.
        run: run id to show.
        step: checkpoint to show; its last one if None.
        max_prompts: cap on the number of pages (seeded choice of prompts).
        seed: seed of the choice of prompts and samples.
        effects: counterfactual effects (data/faithfulness/<run>/effects.parquet: run, step, prompt_id,
            sample, pos, decisive); where they cover the shown step, decisive tokens are boxed.

    Returns:
        the written pages, index first.
    """
    step, completions = choose_completions(dumps, run, step, max_prompts, seed)
    completions = with_effects(completions, run, step, effects)
    out_dir = Path(out_dir)
    written = [out_dir / "index.html"]
    atomic_write(written[0], lambda tmp: tmp.write_text(index_page(run, step, completions), encoding="utf-8"))
    for completion in completions:
        page = out_dir / page_name(completion.prompt_id)
        text = completion_page(completion, step)
        atomic_write(page, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
        written.append(page)
    for stale in sorted(set(out_dir.glob("*.html")) - set(written)):
        stale.unlink()  # pages of an earlier choice would otherwise linger as untracked outputs
    return written


def heatmap_png(
    dumps: pd.DataFrame,
    out: Path,
    run: str,
    step: int | None = None,
    max_prompts: int = 8,
    examples: int = 3,
    max_tokens: int = 40,
    seed: int = 0,
) -> Path:
    """Static PNG of a few completions (the first `max_tokens` tokens each): one row per signal.

    Uses the same seeded choice as `heatmap_pages` with the same `max_prompts` and `seed`, and shows the
    first `examples` of its pages.
    """
    step, completions = choose_completions(dumps, run, step, max_prompts, seed)
    completions = completions[:examples]
    panel_height = 2.2 * max(1.0, len(signals_in(dumps)) / 6)  # inches; 2.2 fits 6 signal rows legibly
    with matplotlib.rc_context(RC), warnings.catch_warnings():
        # Tokens in scripts DejaVu Sans lacks (e.g. CJK) render as boxes; one warning per glyph is noise.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        fig = Figure(figsize=(12, 0.6 + panel_height * len(completions)), layout="constrained")
        axes = np.atleast_1d(fig.subplots(len(completions), 1))
        for ax, completion in zip(axes, completions):
            rows = completion.rows.iloc[:max_tokens]
            signals = signals_in(rows)
            levels = np.stack([log2_weight(rows[f"w_{s}"].to_numpy()) for s in signals])  # (S, T)
            image = ax.imshow(levels, cmap=_CMAP, vmin=-LOG2_RANGE, vmax=LOG2_RANGE, aspect="auto")
            ax.set_yticks(range(len(signals)), signals)
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels(
                [visible_token(t) for t in rows["token"].astype(str)], rotation=90, fontsize=7, parse_math=False
            )  # tokens such as "$" are not mathtext
            ax.grid(False)
            reward = float(rows["reward"].iat[0])
            ax.set_title(
                f"run {run}, step {step}, prompt {completion.prompt_id}, sample {completion.sample}, "
                f"reward {reward:.3g} (first {len(rows)} tokens)",
                parse_math=False,
            )
        bar = fig.colorbar(image, ax=list(axes), label="weight w (log scale)", shrink=0.9)
        ticks = np.arange(-LOG2_RANGE, LOG2_RANGE + 1)
        bar.set_ticks(ticks, labels=[f"{2.0**t:g}" if t >= 0 else f"1/{2.0**-t:g}" for t in ticks])
        save_png(fig, out)
    return Path(out)
