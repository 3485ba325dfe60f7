"""Packaging rules (issue 11): ranges in pyproject.toml, one exact lock (constraints.txt) that satisfies them and that
this environment matches, and only `arca` installed. The wheel itself is checked by .ci/wheel_check.sh."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and "+" not in version, f"constraints.txt: {line!r} must be name==version, no local tag"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def requirements(*extras: str) -> list[Requirement]:
    lines = list(PROJECT["dependencies"])
    for extra in extras:
        lines += PROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def test_dependencies_are_ranges():
    for req in requirements():
        assert req.specifier, f"{req}: give a lower bound (the release we test against)"
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"{req}: a range, not a pin"
    trl = next(r for r in requirements() if r.name == "trl")
    assert not trl.specifier.contains("1.17.0") and trl.specifier.contains("1.16.9")  # one minor at a time


def test_only_arca_and_all_of_it_is_installed():
    """Every package folder under arca/ is listed: a forgotten subpackage makes the wheel fail on import."""
    subpackages = sorted(f"arca.{d.name}" for d in (ROOT / "arca").iterdir() if (d / "__init__.py").is_file())
    assert PYPROJECT["tool"]["setuptools"]["packages"] == ["arca", *subpackages]
    assert set(PROJECT["optional-dependencies"]) == {"pipeline", "test", "vllm"}


@pytest.mark.parametrize("extras", [(), ("pipeline", "test")])
def test_lock_satisfies_the_ranges(extras):
    pins = lock()
    for req in requirements(*extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt: {req.name} is missing; rerun .ci/lock.sh"
        assert req.specifier.contains(pins[name]), f"constraints.txt: {req.name}=={pins[name]} is outside {req}"


def test_this_environment_is_the_lock():
    """`make` installs constraints.txt: the tests run on exactly the locked direct dependencies."""
    pins = lock()
    for req in requirements("pipeline", "test"):
        installed = Version(Version(importlib.metadata.version(req.name)).public)  # 2.13.0+cpu -> 2.13.0
        assert installed == pins[canonicalize_name(req.name)], f"{req.name} {installed} is not the locked version"
