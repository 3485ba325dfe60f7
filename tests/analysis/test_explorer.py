"""Tests for arca.analysis.explorer on a small synthetic token table built here, and the page in a real browser:
headless Chromium (Debian's `chromium`, which .ci/run installs) renders it, and the screenshot and the DOM after
the page's script ran are checked. The browser tests skip, saying why, only where no Chromium is found."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arca.analysis.explorer import compact, explorer_data, explorer_html, rounded, visible_token, write_explorer
from arca.credit.diagnostics import effective_token_ratio, gini

SIGNALS = ("uniform", "kl", "arca")
RUNS = {"arca-r8-s0": "arca", "kl-r8-s0": "kl", "uniform-r8-s0": "uniform"}
NASTY = ["</script><script>window.bad=1</script>", "&amp;", '"q"', "\n", " x", "$a$", "<b>"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def make_tokens(seed: int = 0) -> pd.DataFrame:
    """3 runs x 2 steps x 2 prompts x 2 samples, ragged lengths, nasty token text, spiky weights."""
    rng = np.random.default_rng(seed)
    rows = []
    for run, method in RUNS.items():
        for step in (0, 4):
            for p in range(2):
                for sample in range(2):
                    T = 8 + 3 * p + sample
                    tokens = (NASTY + [f"t{i}" for i in range(T)])[:T]
                    a = {s: rng.gamma(0.5, size=T) for s in SIGNALS}
                    a["uniform"] = np.ones(T)
                    for pos in range(T):
                        row = {
                            "run": run,
                            "method": method,
                            "step": np.int32(step),
                            "prompt_id": f"p{p}",
                            "sample": np.int32(sample),
                            "pos": np.int32(pos),
                            "token_id": np.int32(100 + pos),
                            "token": tokens[pos],
                            "reward": np.float32((p + sample) % 2),
                            "advantage": np.float32(0.5 - (p + sample) % 2),
                        }
                        for s in SIGNALS:
                            row[f"a_{s}"] = np.float32(a[s][pos])
                            row[f"w_{s}"] = np.float32(a[s][pos] / a[s].mean())
                        rows.append(row)
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed)  # shuffled: the page must sort


def make_effects(tokens: pd.DataFrame) -> pd.DataFrame:
    """SPEC 9 rows for the final step of the ARCA run: positions 1..4 scored, 2 and 3 decisive."""
    keys = tokens[(tokens["run"] == "arca-r8-s0") & (tokens["step"] == 4)][["run", "step", "prompt_id", "sample"]]
    rows = [
        {**key, "pos": pos, "decisive": pos in (2, 3)}
        for key in keys.drop_duplicates().to_dict("records")
        for pos in (1, 2, 3, 4)
    ]
    return pd.DataFrame(rows)


PROBLEMS = pd.DataFrame(
    {"prompt_id": ["p0", "p1"], "problem": ["What is 2 + 3?", "Compute 7 - <4>."], "answer": ["5", None]}
)


def spread(values, n: int) -> list:
    """A page value over n tokens: its list, or its one shared number repeated (explorer.compact)."""
    return values if isinstance(values, list) else [values] * n


def test_every_completion_with_its_concentration_and_marks():
    tokens = make_tokens()
    data = explorer_data(tokens, effects=make_effects(tokens), problems=PROBLEMS)
    assert data["signals"] == list(SIGNALS) and data["initial_signal"] == "arca"
    completions = data["completions"]
    assert len(completions) == 3 * 2 * 2 * 2
    assert [(c["run"], c["step"], c["prompt_id"], c["sample"]) for c in completions] == sorted(
        (c["run"], c["step"], c["prompt_id"], c["sample"]) for c in completions
    )
    for c in completions:
        rows = tokens[
            (tokens["run"] == c["run"])
            & (tokens["step"] == c["step"])
            & (tokens["prompt_id"] == c["prompt_id"])
            & (tokens["sample"] == c["sample"])
        ].sort_values("pos")
        assert c["pos"] == list(range(len(rows))) and c["tok"] == [visible_token(t) for t in rows["token"]]
        assert c["method"] == RUNS[c["run"]] and c["reward"] == float(rows["reward"].iat[0])
        for k, s in enumerate(SIGNALS):
            w = rows[f"w_{s}"].to_numpy(np.float64)[None]  # (1, T): the padded reference functions
            assert c["gini"][k] == pytest.approx(gini(w, np.ones_like(w))[0], rel=5e-3, abs=1e-9)
            assert c["etr"][k] == pytest.approx(effective_token_ratio(w, np.ones_like(w))[0], rel=5e-3)
            assert spread(c["w"][k], len(rows)) == pytest.approx(rows[f"w_{s}"].tolist(), rel=5e-3)
            assert spread(c["a"][k], len(rows)) == pytest.approx(rows[f"a_{s}"].tolist(), rel=5e-3)
        assert c["w"][0] == 1.0 and c["a"][0] == 1.0  # uniform: one number for every token
        marked = c["run"] == "arca-r8-s0" and c["step"] == 4
        assert (c["dec"], c["scored"]) == (([2, 3], [1, 2, 3, 4]) if marked else ([], []))
    assert data["problems"] == {"p0": {"problem": "What is 2 + 3?", "answer": "5"},
                                "p1": {"problem": "Compute 7 - <4>.", "answer": None}}  # fmt: skip


def test_floats_are_rounded_and_nan_is_null():
    values = [0.123456, 1234.5678, 1.23456e-7, float("nan"), float("inf")]
    assert rounded(values) == [0.123, 1230.0, 1.23e-7, None, None]
    assert compact([1.0, 1.0001, 0.99999]) == 1.0 and compact([1.0, 2.0]) == [1.0, 2.0] and compact([]) == []


class _Scripts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts, self.external = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts.append(attrs.get("type", "text/javascript"))
        for name in ("src", "href"):
            if re.match(r"\w+://|//", attrs.get(name) or ""):
                self.external.append((tag, attrs[name]))


def test_page_is_self_contained_and_token_text_cannot_break_out():
    tokens = make_tokens()
    page = explorer_html(tokens, effects=make_effects(tokens), problems=PROBLEMS, title="T <&> runs")
    parser = _Scripts()
    parser.feed(page)
    assert parser.scripts == ["application/json", "text/javascript"]  # the nasty token opened no script
    assert parser.external == [] and "http://" not in page and "https://" not in page
    assert "<title>T &lt;&amp;&gt; runs</title>" in page
    payload = page.split('<script type="application/json" id="data">', 1)[1].split("</script>", 1)[0]
    data = json.loads(payload)
    assert data["completions"][0]["tok"][0] == visible_token(NASTY[0])  # the text survives, escaped
    assert explorer_data(tokens, effects=make_effects(tokens), problems=PROBLEMS) == data
    reordered = tokens.sample(frac=1.0, random_state=1)  # the page is a function of the rows, not their order
    assert explorer_html(reordered, effects=make_effects(tokens), problems=PROBLEMS, title="T <&> runs") == page


def test_without_effects_problems_or_optional_columns():
    tokens = make_tokens().drop(columns=["a_kl", "token_id", "advantage", "method"])
    data = explorer_data(tokens)
    c = data["completions"][0]
    assert c["a"][1] is None and c["advantage"] is None and c["method"] == "" and c["dec"] == []
    assert data["problems"] == {}
    only_kl = tokens.drop(columns=[c for c in tokens.columns if c.endswith(("_arca", "_uniform"))])
    assert explorer_data(only_kl)["initial_signal"] == "kl"


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ("tokens", "prompt_id"),
        ("tokens", "w_<signal>"),
        ("effects", "decisive"),
        ("problems", "problem"),
    ],
)
def test_bad_input_names_the_table_and_column(frame, field):
    tokens, effects, problems = make_tokens(), None, None
    if frame == "tokens":
        drop = ["prompt_id"] if field == "prompt_id" else [c for c in tokens.columns if c.startswith("w_")]
        tokens = tokens.drop(columns=drop)
    elif frame == "effects":
        effects = make_effects(tokens).drop(columns=["decisive"])
    else:
        problems = PROBLEMS.drop(columns=["problem"])
    with pytest.raises(ValueError, match=rf"{frame}: missing columns .*{re.escape(field)}"):
        explorer_html(tokens, effects=effects, problems=problems)


def test_write_explorer_is_atomic_utf8(tmp_path):
    out = write_explorer(tmp_path / "sub" / "explorer.html", make_tokens(), title="ü")
    assert out.read_text(encoding="utf-8").count("<title>ü</title>") == 1
    assert [p.name for p in out.parent.iterdir()] == ["explorer.html"]  # no temporary left beside it


# ---------------------------------------------------------------------------------------------------------
# A real browser: the page's script must run and draw.


def chromium() -> str | None:
    """A headless-capable Chromium: $ARCA_CHROMIUM, else the first of BROWSERS on PATH."""
    if os.environ.get("ARCA_CHROMIUM"):
        return os.environ["ARCA_CHROMIUM"]
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def headless(browser: str, page: Path, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """One headless Chromium run on `page` (a local file, no network) with `flags`."""
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,1000",
        *flags,
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    browser = chromium()
    if browser is None:
        pytest.skip(
            f"no Chromium found ({', '.join(BROWSERS)} not on PATH, ARCA_CHROMIUM unset): the browser test did not "
            "run; `apt-get install chromium` (what .ci/run does) enables it"
        )
    tmp_path = tmp_path_factory.mktemp("browser")
    tokens = make_tokens()
    page = write_explorer(tmp_path / "explorer.html", tokens, effects=make_effects(tokens), problems=PROBLEMS)
    return browser, page, tmp_path


def test_browser_dom_after_the_script_holds_every_run_and_a_decisive_token(browser_page):
    browser, page, tmp_path = browser_page
    dom = headless(browser, page, tmp_path, "--dump-dom").stdout
    dom = dom.split('<script type="application/json"', 1)[0]  # only what the script drew, not its data
    # The overview table and the run selector are built by the script, one row / option per run.
    assert sorted(set(re.findall(r'<tr class="row[^"]*" data-run="([^"]+)"', dom))) == sorted(RUNS)
    assert sorted(re.findall(r'<option value="([^"]+-r8-s0)"', dom)) == sorted(RUNS)
    decisive = re.findall(r'<span class="tok dec" data-i="(\d+)"', dom)  # the first view shows the SPEC 9 marks
    assert decisive == ["2", "3"]
    assert "What is 2 + 3?" in dom and "window.bad" not in dom.split('id="panels"', 1)[0]


def test_browser_screenshot_is_not_blank(browser_page):
    from PIL import Image

    browser, page, tmp_path = browser_page
    shot = tmp_path / "explorer.png"
    headless(browser, page, tmp_path, f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)  # (H, W, 3)
    assert pixels.shape[:2] == (1000, 1280)
    assert pixels.std() > 10, "the screenshot is one flat color"
    # Weight colors are strongly red or blue; static text and controls are gray. A page whose script did not
    # run draws no token, so no saturated pixel.
    chroma = np.abs(pixels[..., 0] - pixels[..., 2])  # (H, W)
    assert (chroma > 80).sum() > 500, "no colored token in the screenshot"
