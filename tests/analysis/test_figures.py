"""Tests for arca.analysis.figures, arca.analysis.heatmap and the figures stage, on a tiny synthetic dump built here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from arca.analysis.figures import (
    SIGNAL_ORDER,
    lorenz_figure,
    lorenz_on_grid,
    lorenz_table,
    regime_map,
    signal_color,
    signals_in,
    training_curves,
    training_table,
)
from arca.analysis.heatmap import heatmap_pages, heatmap_png, page_name, visible_token
from arca.credit.signals import SIGNAL_NAMES
from stages import figures as stage
from tests.params import default_params

SIGNALS = SIGNAL_NAMES
FLOAT32_CHECKED = ("kl", "arca", "arca_local")  # a32_ columns, as in a bf16 run's dump
NASTY = ["<script>", "&amp;", '"q"', "'", "\n", " x", "$a$"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUNS = {"r-arca": ("arca", 8, 0), "r-kl": ("kl", 16, 1)}


def spec_gini(w: np.ndarray) -> float:
    """SPEC 5 Gini, written out directly."""
    w = np.sort(w.astype(np.float64))
    t = len(w)
    if t == 1 or w.sum() == 0:
        return 0.0
    return float(2 * np.sum(np.arange(1, t + 1) * w) / (t * w.sum()) - (t + 1) / t)


def make_dumps(seed: int = 0) -> pd.DataFrame:
    """2 runs x 2 steps x 3 prompts x 2 samples, ragged lengths, nasty token text in every completion."""
    rng = np.random.default_rng(seed)
    rows = []
    for run, (method, rank, run_seed) in RUNS.items():
        for step in (0, 10):
            for p in range(3):
                for sample in range(2):
                    T = 9 + 3 * p + sample + (step // 10)
                    tokens = (NASTY + [f"t{i}" for i in range(T)])[:T]
                    reward = float((p + sample) % 2)
                    base = {
                        "run": run,
                        "method": method,
                        "rank": np.int32(rank),
                        "seed": np.int32(run_seed),
                        "step": np.int32(step),
                        "prompt_id": f"math/test/{p}.json",
                        "sample": np.int32(sample),
                        "reward": np.float32(reward),
                        "advantage": np.float32(reward - 0.5),
                    }
                    raw = {s: rng.gamma(0.5 + SIGNALS.index(s), size=T) for s in SIGNALS}
                    raw["uniform"] = np.ones(T)
                    if step == 0:
                        raw["arca"] = np.zeros(T)  # LoRA B = 0 at init: ARCA falls back to uniform
                    for pos in range(T):
                        row = dict(base, pos=np.int32(pos), token_id=np.int32(pos + 3), token=tokens[pos])
                        for s in SIGNALS:
                            a = raw[s]
                            w = a / a.mean() if a.sum() > 0 else np.ones(T)
                            row[f"a_{s}"] = np.float32(a[pos])
                            row[f"w_{s}"] = np.float32(w[pos])
                        for s in FLOAT32_CHECKED:
                            row[f"a32_{s}"] = np.float32(raw[s][pos] * 0.9)
                        rows.append(row)
    return pd.DataFrame(rows)


def make_trajectories(dumps: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (run, method, rank, step, prompt_id, sample), g in dumps.groupby(
        ["run", "method", "rank", "step", "prompt_id", "sample"]
    ):
        for s in SIGNALS:
            w = g[f"w_{s}"].to_numpy(np.float64)
            etr = w.sum() ** 2 / (len(w) * (w**2).sum())
            rows.append(
                {
                    "run": run,
                    "method": method,
                    "rank": rank,
                    "seed": 0,
                    "step": step,
                    "phase": "init" if step == 0 else "final",
                    "prompt_id": prompt_id,
                    "sample": sample,
                    "signal": s,
                    "over": "weight",
                    "T": len(w),
                    "gini": spec_gini(w),
                    "etr": etr,
                    "regime": "uniform" if etr >= 0.95 else "middle",
                    "fallback": False,
                }
            )
    return pd.DataFrame(rows)


def make_logs() -> pd.DataFrame:
    steps = np.arange(0, 12, 2)
    frames = [
        pd.DataFrame(
            {
                "run": run,
                "method": m,
                "rank": r,
                "seed": s,
                "step": steps,
                "reward": np.linspace(0.1, 0.4, 6),
                "gini": np.linspace(0, 0.5, 6),
                "etr": np.linspace(1, 0.5, 6),
            }
        )
        for run, (m, r, s) in RUNS.items()
    ]
    return pd.concat(frames, ignore_index=True)  # no fallback_rate column: it is optional


@pytest.fixture(scope="module")
def dumps() -> pd.DataFrame:
    return make_dumps()


def assert_png(path: Path) -> bytes:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    return data


def test_every_signal_has_its_own_color_in_spec_order(dumps):
    assert SIGNAL_ORDER == SIGNAL_NAMES  # figures keep their own copy so they need no torch
    colors = [signal_color(s) for s in SIGNAL_ORDER]
    assert len(set(colors)) == len(colors)
    assert signals_in(dumps) == list(SIGNAL_NAMES)  # a32_ columns are no signals of their own


def test_a_permuted_method_is_its_signals_color_lighter():
    from matplotlib.colors import to_rgb

    from arca.credit.config import PERMUTED_SUFFIX

    for signal in SIGNAL_ORDER:
        base, permuted = to_rgb(signal_color(signal)), to_rgb(signal_color(signal + PERMUTED_SUFFIX))
        assert permuted != base and all(p >= b for p, b in zip(permuted, base)), signal  # toward white
        # the same hue: every channel moves the same share (0.55, up to hex rounding) of its way to white
        assert all(abs((p - b) / (1 - b) - 0.55) < 0.02 for p, b in zip(permuted, base) if b < 0.9), signal


def test_lorenz_on_grid_matches_spec_gini():
    rng = np.random.default_rng(1)
    lengths = [1, 2, 5, 17, 4]
    weights = [rng.gamma(0.3, size=t) for t in lengths]
    weights[3][:] = 0.0
    weights[3][7] = 17.0  # all credit on one token: G = 1 - 1/T
    weights.append(np.zeros(3))  # zero total: uniform fallback
    codes = np.concatenate([np.full(len(w), i) for i, w in enumerate(weights)])
    grid = np.linspace(0, 1, 17 * 5 * 4 + 1)  # contains every breakpoint i / T
    curves, gini = lorenz_on_grid(codes, np.concatenate(weights), grid)
    np.testing.assert_allclose(gini, [spec_gini(w) for w in weights], atol=1e-12)
    assert gini[3] == pytest.approx(1 - 1 / 17)
    np.testing.assert_allclose(curves[:, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(curves[:, -1], 1.0, atol=1e-12)
    np.testing.assert_allclose(curves[-1], grid)  # zero total weight is drawn as the diagonal
    area = ((curves[:, 1:] + curves[:, :-1]) / 2 * np.diff(grid)).sum(axis=1)
    np.testing.assert_allclose(1 - 2 * area, gini, atol=1e-9)  # Gini = 1 - 2 x area under the curve


@pytest.mark.parametrize("by", ["phase", "rank"])
def test_lorenz_figure_is_deterministic(dumps, tmp_path, by):
    first = assert_png(lorenz_figure(dumps, tmp_path / "a.png", by=by))
    assert first == assert_png(lorenz_figure(dumps, tmp_path / "b.png", by=by))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary behind
    with pytest.raises(ValueError, match="by"):
        lorenz_figure(dumps, tmp_path / "c.png", by="seed")


def test_lorenz_table_holds_the_drawn_curves_in_panel_order(dumps):
    """The `dvc plots` data of the Lorenz figure: the averaged curve per panel and signal on 21 token shares;
    uniform is the diagonal, every curve runs from (0, 0) to (1, 1) below it, and 1 - 2 x its area is the Gini."""
    table = lorenz_table(dumps, by="phase")
    panels = list(dict.fromkeys(table["panel"]))
    assert len(panels) > 1 and panels == [f"phase {p}" for p in ("init", "mid", "final") if f"phase {p}" in panels]
    assert table.groupby("panel", sort=False)["panel_order"].first().is_monotonic_increasing
    for (_, signal), curve in table.groupby(["panel", "signal"]):
        share, credit = curve["token_share"].to_numpy(), curve["credit_share"].to_numpy()
        assert len(curve) == 21 and credit[0] == 0 and credit[-1] == pytest.approx(1)
        assert (credit <= share + 1e-9).all()
        if signal == "uniform":
            np.testing.assert_allclose(credit, share)
    final = table[(table["panel"] == table["panel"].iloc[-1]) & (table["signal"] != "uniform")]
    assert (final.groupby("signal")["credit_share"].mean() < 0.5).any()  # some signal concentrates


def test_regime_map(dumps, tmp_path):
    traj = make_trajectories(dumps)
    first = assert_png(regime_map(traj, tmp_path / "a.png", 0.95, 0.25, max_points=40, seed=3))
    assert first == assert_png(regime_map(traj, tmp_path / "b.png", 0.95, 0.25, max_points=40, seed=3))
    with pytest.raises(ValueError, match="etr_concentrated"):
        regime_map(traj, tmp_path / "c.png", 0.2, 0.25)
    with pytest.raises(ValueError, match="over"):
        regime_map(traj, tmp_path / "c.png", 0.95, 0.25, over="raw")


def test_training_curves_png_and_csv(tmp_path):
    logs = make_logs()
    evals = pd.DataFrame({"run": ["r-arca"], "pass@1": [0.3]})
    png, csv = training_curves(logs, tmp_path / "t.png", tmp_path / "t.csv", evals)
    first = assert_png(png)
    table = pd.read_csv(csv)
    assert list(table.columns) == ["run", "method", "rank", "seed", "step", "reward", "gini", "etr", "fallback_rate"]
    assert len(table) == len(logs) and table["fallback_rate"].isna().all()
    pd.testing.assert_frame_equal(table, training_table(logs), check_dtype=False)
    csv_bytes = csv.read_bytes()
    training_curves(logs, tmp_path / "t.png", tmp_path / "t.csv", evals)
    assert first == png.read_bytes() and csv_bytes == csv.read_bytes()


def test_heatmap_pages_escape_tokens(dumps, tmp_path):
    (tmp_path / "stale.html").write_text("old")
    pages = heatmap_pages(dumps, tmp_path, "r-arca", max_prompts=2, seed=0)
    assert pages[0].name == "index.html" and len(pages) == 3
    assert sorted(tmp_path.glob("*.html")) == sorted(pages)  # the stale page is gone
    index = pages[0].read_text(encoding="utf-8")
    for page in pages[1:]:
        assert f'href="{page.name}"' in index
        text = page.read_text(encoding="utf-8")
        assert "<script>" not in text and "&lt;script&gt;" in text
        assert "&amp;amp;" in text and "&quot;q&quot;" in text and "&#x27;" in text
        assert "\u23ce" in text and "\u00b7x" in text  # newline and space made visible
        assert "run" in text and "r-arca" in text and "reward" in text
        assert text.count("<tr><th>arca ") == text.count("<tr><th>kl ")  # one row per signal in each block
        assert text.count("<tr><th>arca_local ") == text.count("<tr><th>divergence ") > 0
    again = tmp_path / "again"
    heatmap_pages(dumps, again, "r-arca", max_prompts=2, seed=0)
    assert [p.read_bytes() for p in pages] == [(again / p.name).read_bytes() for p in pages]
    with pytest.raises(ValueError, match="run"):
        heatmap_pages(dumps, tmp_path, "nope")


def test_heatmap_png_is_deterministic(dumps, tmp_path):
    first = assert_png(heatmap_png(dumps, tmp_path / "a.png", "r-kl", examples=2, max_tokens=12))
    assert first == assert_png(heatmap_png(dumps, tmp_path / "b.png", "r-kl", examples=2, max_tokens=12))


def test_token_display_and_page_names():
    assert visible_token("a b\n\t") == "a\u00b7b\u23ce\u21e5"
    assert visible_token("") == "\u2205" and visible_token("\x00") == "\\x00"
    names = {page_name(p) for p in ["math/test/1.json", "math_test_1.json", "a<b>"]}
    assert len(names) == 3 and all(n.endswith(".html") and "/" not in n and "<" not in n for n in names)
    assert page_name("p-1") == "p-1.html"


PARAMS = {
    "diagnostics": {"etr_uniform": 0.95, "etr_concentrated": 0.25},
    "figures": {"heatmap_prompts": 2, "heatmap_run": None, "seed": 0},
}


def write_inputs(root: Path, dumps: pd.DataFrame) -> None:
    (root / "data/dumps").mkdir(parents=True)
    for run, rows in dumps.groupby("run"):
        rows.to_parquet(root / f"data/dumps/{run}.parquet", index=False)
    (root / "data/diagnostics").mkdir(parents=True)
    make_trajectories(dumps).to_parquet(root / "data/diagnostics/trajectories.parquet", index=False)
    for run, rows in make_logs().groupby("run"):
        (root / f"data/runs/{run}").mkdir(parents=True)
        rows.drop(columns=["run", "method", "rank", "seed"]).to_csv(
            root / f"data/runs/{run}/log.tsv", sep="\t", index=False
        )
        method, rank, seed = RUNS[run]
        (root / f"data/runs/{run}/budget.json").write_text(json.dumps({"method": method, "rank": rank, "seed": seed}))
    (root / "data/prepared").mkdir(parents=True)
    ids = sorted(dumps["prompt_id"].unique())
    probes = {"prompt_id": ids, "problem": [f"Problem {i.split('/')[-1][:-5]}?" for i in ids]}
    pd.DataFrame({**probes, "answer": [i.split("/")[-1][:-5] for i in ids]}).to_parquet(
        root / "data/prepared/probe.parquet"
    )
    final = dumps[(dumps["run"] == "r-arca") & (dumps["step"] == 10) & (dumps["pos"] < 3)]
    effects = final[["run", "step", "prompt_id", "sample", "pos"]].assign(decisive=final["pos"] == 1)
    (root / "data/faithfulness/r-arca").mkdir(parents=True)
    effects.to_parquet(root / "data/faithfulness/r-arca/effects.parquet")
    (root / "data/eval").mkdir()
    (root / "data/eval/r-kl.json").write_text(json.dumps({"run": "r-kl", "method": "kl", "pass@1": 0.2}))


def test_stage_end_to_end(dumps, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_inputs(tmp_path, dumps)
    Path("params.yaml").write_text(yaml.safe_dump(default_params(PARAMS)))
    result = CliRunner().invoke(stage.main, ["--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    for name in ["lorenz.png", "regime_map.png", "training_curves.png", "heatmaps.png"]:
        assert_png(tmp_path / "results/figures" / name)
    pages = sorted((tmp_path / "results/figures/heatmaps").glob("*.html"))
    assert len(pages) == 3 and "r-arca" in (tmp_path / "results/figures/heatmaps/index.html").read_text()
    table = pd.read_csv(tmp_path / "results/plots/training_curves.csv")
    assert set(table["run"]) == set(RUNS) and table["rank"].notna().all()
    explorer = (tmp_path / "results/figures/explorer.html").read_text(encoding="utf-8")
    data = json.loads(explorer.split('id="data">', 1)[1].split("</script>", 1)[0])
    assert {c["run"] for c in data["completions"]} == set(RUNS) and {c["step"] for c in data["completions"]} == {0, 10}
    assert len(data["completions"]) == dumps.groupby(["run", "step", "prompt_id", "sample"]).ngroups
    assert data["problems"]["math/test/1.json"] == {"problem": "Problem 1?", "answer": "1"}
    marked = [c for c in data["completions"] if c["dec"]]  # the effects written for r-arca at step 10
    assert {(c["run"], c["step"]) for c in marked} == {("r-arca", 10)} and all(c["dec"] == [1] for c in marked)
    lorenz = pd.read_csv(tmp_path / "results/plots/lorenz.csv")  # the data-backed DVC plots (dvc.yaml `plots:`)
    assert {"panel", "signal", "token_share", "credit_share"} <= set(lorenz.columns) and len(lorenz)
    for name in ("faithfulness", "degeneration"):  # no SPEC 9 / 10 inputs here: the header only
        assert pd.read_csv(tmp_path / f"results/plots/{name}.csv").empty


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("diagnostics", "etr_uniform", "high"),
        ("diagnostics", "etr_concentrated", 0.99),
        ("figures", "heatmap_prompts", 0),
        ("figures", "seed", -1),
        ("figures", "heatmap_run", 3),
    ],
)
def test_stage_rejects_bad_params_before_reading_data(tmp_path, monkeypatch, section, key, value):
    monkeypatch.chdir(tmp_path)  # no data at all: the params error must come first
    params = default_params(PARAMS)
    params[section][key] = value
    Path("params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(stage.main, ["--params", "params.yaml"])
    assert result.exit_code != 0 and f"{section}.{key}" in result.output
