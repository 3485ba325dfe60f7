"""Lineage for results tables: DVC-style content hashes of the files a row came from and the git revision."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_md5(path: Path | str) -> str:
    """The md5 DVC records in dvc.lock: the file's md5, or for a directory the md5 of its sorted
    `[{"md5", "relpath"}]` manifest with a `.dir` suffix."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: cannot hash a missing output; run its stage first")
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(path).as_posix()}
        for p in sorted(path.rglob("*"), key=lambda p: p.relative_to(path).parts)
        if p.is_file()
    ]
    manifest = json.dumps(entries, sort_keys=True).encode()
    return hashlib.md5(manifest).hexdigest() + ".dir"


def git_revision(cwd: Path | str = ".") -> str:
    """`git rev-parse HEAD` (short), or "unknown" outside a git checkout or before the first commit."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()
