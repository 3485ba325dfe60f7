import json
import shutil
import subprocess

import pytest

from arca.analysis.lineage import dvc_md5, git_revision


def test_dvc_md5_matches_dvc_add(tmp_path):
    if shutil.which("dvc") is None and not (shutil.which("git")):
        pytest.skip("dvc/git not available")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "x").write_text("a\n")
    (tmp_path / "d" / "a.b").write_text("c\n")
    (tmp_path / "d" / "sub" / "y").write_text("b\n")
    (tmp_path / "f.txt").write_text("hi\n")
    import dvc.repo

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    repo = dvc.repo.Repo.init(str(tmp_path))
    repo.add([str(tmp_path / "d"), str(tmp_path / "f.txt")])
    import yaml

    for name in ("d", "f.txt"):
        recorded = yaml.safe_load((tmp_path / f"{name}.dvc").read_text())["outs"][0]["md5"]
        assert dvc_md5(tmp_path / name) == recorded


def test_dvc_md5_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="run its stage first"):
        dvc_md5(tmp_path / "nope")


def test_git_revision_outside_repo(tmp_path):
    assert git_revision(tmp_path) == "unknown"
    json.dumps(git_revision())  # always a plain string
