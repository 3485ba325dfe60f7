"""Nothing lost on failure: a stage killed mid-write leaves the workspace restorable, byte for byte, by the one
documented command `RESTORE` (docs/pipeline.md, "After a failed or killed stage").

A tiny two-stage pipeline in a temp git + DVC repo mirrors ours: `prepare` writes a cached directory and an
uncached, git-committed metrics file; `tables` writes an uncached results directory and an uncached metrics
file. Both write through `arca.io`, as every stage does. Why the command has three parts: before it runs a
stage DVC deletes the stage's outputs, so after a kill its cached outputs are missing (`dvc checkout` brings them
back from .dvc/cache) and its uncached ones are gone (they live only in git); stages that finished earlier in
the same `dvc repro` have already rewritten dvc.lock and their outputs (reverting dvc.lock with the committed
files keeps the two consistent); a writer killed inside `arca.io.atomic_path` leaves its temporary directory
behind (`git clean` removes it; ignored files, i.e. DVC-cached outputs and checkpoints, are never touched).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

# The documented restore: the last committed outputs back in place, params and code edits untouched.
RESTORE = (
    "git checkout HEAD -- dvc.lock metrics results data && git clean -fdq -- metrics results data "
    "&& dvc checkout --force"
)

DVC_YAML = {
    "stages": {
        "prepare": {
            "cmd": "python prepare.py",
            "deps": ["prepare.py"],
            "params": ["prepare.n"],
            "outs": ["data/prepared"],
            "metrics": [{"metrics/prepare.json": {"cache": False}}],
        },
        "tables": {
            "cmd": "python tables.py",
            "deps": ["tables.py", "data/prepared"],
            "outs": [{"results/tables": {"cache": False}}],
            "metrics": [{"metrics/accuracy.json": {"cache": False}}],
        },
    },
    "metrics": ["metrics/prepare.json", "metrics/accuracy.json"],
}

PREPARE = """\
import yaml
from arca.io import write_json, write_text

n = yaml.safe_load(open("params.yaml"))["prepare"]["n"]
write_text("data/prepared/items.txt", "".join(f"{i}\\n" for i in range(n)))
write_text("data/prepared/more.txt", f"{n}\\n")
write_json("metrics/prepare.json", {"n": n})
"""

# Writes its outputs one file at a time; with KILL_AT=<path> it stops halfway through that file inside
# arca.io.atomic_path, touches $SENTINEL and then SIGKILLs itself (KILL_SELF=1) or waits to be killed.
TABLES = """\
import os, signal, time
from pathlib import Path
from arca.io import atomic_path, write_json, write_text

items = Path("data/prepared/items.txt").read_text().split()
outputs = {
    "results/tables/accuracy.md": "| item |\\n" + "".join(f"| {i} |\\n" for i in items),
    "results/tables/accuracy.csv": "item\\n" + "".join(f"{i}\\n" for i in items),
}
for path, text in outputs.items():
    if path == os.environ.get("KILL_AT"):
        with atomic_path(path) as tmp:
            tmp.write_text(text[: len(text) // 2])
            Path(os.environ["SENTINEL"]).touch()
            if os.environ.get("KILL_SELF"):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)
    write_text(path, text)
write_json("metrics/accuracy.json", {"items": len(items)})
"""


def _env(**extra: str) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1", **extra}


def _sh(cmd: str, cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, shell=True, cwd=cwd, env=_env(**env), capture_output=True, text=True)
    if check:
        assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the workspace (git and DVC internals excluded) -> its bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in (".git", ".dvc")
    }


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    """The tiny pipeline after a complete `dvc repro`, committed (as after `make repro` + `git commit`)."""
    root = tmp_path_factory.mktemp("failure") / "repo"
    root.mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "params.yaml").write_text("prepare:\n  n: 3\n")
    (root / "prepare.py").write_text(PREPARE)
    (root / "tables.py").write_text(TABLES)
    _sh("git init -q && git config user.email t@t && git config user.name t && dvc init -q", root)
    _sh("dvc repro -q", root)
    _sh("git add -A && git -c commit.gpgsign=false commit -qm results", root)
    return root


@pytest.fixture
def repo(committed: Path, tmp_path: Path) -> Path:
    """A fresh copy of the committed repo (DVC cache included), so each test starts from the same state."""
    root = tmp_path / "repo"
    shutil.copytree(committed, root, symlinks=True)
    return root


def _assert_restored(root: Path, before: dict[str, bytes], expect_status_clean: bool = True) -> None:
    _sh(RESTORE, root)
    after = _snapshot(root)
    assert sorted(after) == sorted(before), f"extra or missing files: {sorted(set(after) ^ set(before))}"
    assert [p for p in before if before[p] != after[p]] == []
    if expect_status_clean:
        status = _sh("dvc status", root).stdout
        assert "up to date" in status, status


def test_stage_killed_mid_write_is_restored_byte_identical(repo, tmp_path):
    before = _snapshot(repo)
    sentinel = tmp_path / "mid-write"
    done = _sh(
        "dvc repro -f tables",
        repo,
        check=False,
        KILL_AT="results/tables/accuracy.csv",
        KILL_SELF="1",
        SENTINEL=str(sentinel),
    )
    assert done.returncode != 0 and sentinel.exists()
    # arca.io: the file being written never appears at its final path; the one written before it is whole.
    assert not (repo / "results/tables/accuracy.csv").exists()
    assert (repo / "results/tables/accuracy.md").read_bytes() == before["results/tables/accuracy.md"]
    assert not (repo / "metrics/accuracy.json").exists()  # DVC deleted the uncached output before the run
    _assert_restored(repo, before)


def test_killed_after_an_earlier_stage_finished_restores_the_committed_outputs(repo, tmp_path):
    """`prepare` reruns for a params change and finishes (new dvc.lock entry, new outputs), then `tables` is
    killed: the restore brings back the committed outputs and dvc.lock of both; the params edit stays."""
    before = _snapshot(repo)
    (repo / "params.yaml").write_text("prepare:\n  n: 5\n")
    sentinel = tmp_path / "mid-write"
    done = _sh(
        "dvc repro", repo, check=False, KILL_AT="results/tables/accuracy.md", KILL_SELF="1", SENTINEL=str(sentinel)
    )
    assert done.returncode != 0 and sentinel.exists()
    assert (repo / "metrics/prepare.json").read_text() != before["metrics/prepare.json"].decode()  # prepare ran
    _assert_restored(repo, before | {"params.yaml": b"prepare:\n  n: 5\n"}, expect_status_clean=False)
    status = _sh("dvc status", repo).stdout
    assert "prepare" in status and "params.yaml" in status  # only the edit itself is pending
    (repo / "params.yaml").write_bytes(before["params.yaml"])
    assert "up to date" in _sh("dvc status", repo).stdout


def test_whole_dvc_process_group_killed_is_restored(repo, tmp_path):
    """SIGKILL to `dvc repro` and its stage at once (preemption, OOM killer, a closed terminal): no cleanup code
    runs anywhere, DVC's locks die with it, and the same command restores the workspace."""
    before = _snapshot(repo)
    sentinel = tmp_path / "mid-write"
    proc = subprocess.Popen(
        ["dvc", "repro", "-f", "tables"],
        cwd=repo,
        env=_env(KILL_AT="results/tables/accuracy.csv", SENTINEL=str(sentinel)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not sentinel.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sentinel.exists(), "the stage never reached its mid-write point"
    assert not (repo / "results/tables/accuracy.csv").exists()
    _assert_restored(repo, before)


def test_make_restore_runs_the_documented_command():
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    recipe = makefile.split("\nrestore:", 1)[1].split("\n\n", 1)[0]
    steps = [line.strip().removeprefix("$(BIN)/") for line in recipe.splitlines()[1:]]
    assert " && ".join(steps) == RESTORE
