import pandas as pd
import pyarrow.parquet as pq
import pytest

from arca.io import atomic_path, read_json, write_json, write_parquet


def test_parquet_is_byte_deterministic_and_keeps_metadata(tmp_path):
    df = pd.DataFrame({"a": [3, 1, 2], "b": ["x", "y", "z"]})
    write_parquet(tmp_path / "one.parquet", df, metadata={"arca.run": "r"})
    write_parquet(tmp_path / "two.parquet", df, metadata={"arca.run": "r"})
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "two.parquet").read_bytes()
    meta = pq.read_schema(tmp_path / "one.parquet").metadata
    assert meta[b"arca.run"] == b"r" and b"pandas" not in meta


def test_failed_write_leaves_previous_output(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "m.json") as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed mid-write")
    assert read_json(tmp_path / "m.json") == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp files left behind


def test_atomic_directory_replace(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with atomic_path(tmp_path / "out") as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]
