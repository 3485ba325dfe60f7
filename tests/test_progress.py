"""`arca.progress`: a tqdm bar with an ETA on a terminal, plain periodic log lines anywhere else (no carriage
returns in a log file), silence without a label; and the long loops of dump and evaluate report through it."""

from __future__ import annotations

import io
import logging
import re

import pandas as pd

from arca.progress import LogLines, progress
from arca.sampling.evaluation import evaluate
from tests.tiny import tiny_model, tiny_tokenizer


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "arca.progress"]


def test_a_terminal_gets_a_redrawn_bar_with_an_eta(caplog):
    stream = Terminal()
    with progress(total=4, desc="dump x", unit="seq", stream=stream) as bar:
        for _ in range(4):
            bar.update(1)
    text = stream.getvalue()
    assert "\r" in text and re.search(r"dump x: 100%\|.*\| 4/4 \[\d\d:\d\d<\d\d:\d\d", text)  # elapsed<remaining
    assert not _lines(caplog)


def test_a_log_gets_plain_lines_every_interval(caplog):
    caplog.set_level(logging.INFO)
    stream = io.StringIO()  # not a terminal, e.g. `dvc repro > log` or CI
    with progress(total=4, desc="evaluate x", unit="seq", stream=stream, every=0) as bar:
        assert isinstance(bar, LogLines)
        for _ in range(4):
            bar.update(1)
    lines = _lines(caplog)
    assert lines[0] == "evaluate x: 0/4 seq (0%), 00:00 elapsed, ETA ?"
    assert lines[-1].startswith("evaluate x: 4/4 seq (100%), ") and len(lines) == 5  # start + one per update
    assert stream.getvalue() == "" and not any("\r" in line for line in lines)
    caplog.clear()
    with progress(total=100, desc="slow", stream=stream, every=3600) as bar:  # an hour between lines
        for _ in range(100):
            bar.update(1)
    assert [line.split(" (")[0] for line in _lines(caplog)] == ["slow: 0/100 it", "slow: 100/100 it"]  # start, end


def test_no_label_is_silent(caplog):
    caplog.set_level(logging.INFO)
    stream = Terminal()
    with progress(total=3, desc=None, stream=stream) as bar:
        bar.update(3)
    assert stream.getvalue() == "" and not _lines(caplog)


def test_evaluate_reports_both_decodes(caplog):
    caplog.set_level(logging.INFO)
    problems = pd.DataFrame({"prompt_id": ["a"], "eval_set": ["x"], "prompt": ["1+1="], "answer": ["2"]})
    evaluate(tiny_model(), tiny_tokenizer(), problems, k=2, max_new_tokens=3, progress="evaluate base")
    ends = {line.split(":")[1].strip() for line in _lines(caplog) if "100%" in line}
    assert ends == {"greedy", "sampled"}
