"""dvc.yaml stays honest: every stage's code deps are exactly the project modules its command imports,
transitively (lazy imports inside functions included), so DVC reruns a stage when and only when code it runs
changes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("arca", "stages")


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """`arca.x` -> arca/x.py (or a package's __init__.py), None for anything outside the project packages."""
    if module.split(".")[0] not in PACKAGES:
        return None
    path = root.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the project modules one file imports, at any depth of its syntax tree."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from arca import signals`
    return {m for m in found if m.split(".")[0] in PACKAGES}


def code_closure(module: str, root: Path = ROOT) -> set[str]:
    """Repo-relative paths of the files `python -m module` runs: the module and every project module it
    reaches through imports. Empty package `__init__.py` files are left out (they hold no code)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop(), root)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path))
    return {p.relative_to(root).as_posix() for p in seen if p.name != "__init__.py" or p.read_text().strip()}


def stage_commands(dvc_yaml: dict) -> dict[str, tuple[str, list[str]]]:
    """stage name -> (module run by its cmd, declared deps), foreach and matrix stages once (their template)."""
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        stage = stage.get("do", stage)  # a foreach stage: its template
        match = re.search(
            r"-m\s+(stages\.\w+)", stage["cmd"] if isinstance(stage["cmd"], str) else " ".join(stage["cmd"])
        )
        if match is None:
            raise ValueError(f"dvc.yaml: stage {name!r} does not run a `-m stages.<name>` module")
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        out[name] = (match.group(1), deps)
    return out


def dep_mismatches(dvc_yaml: dict, root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """stage -> {"missing": [...], "extra": [...]} for every stage whose declared .py deps under the project
    packages differ from the closure of its command's imports."""
    problems = {}
    for name, (module, deps) in stage_commands(dvc_yaml).items():
        declared = {d for d in deps if d.endswith(".py") and d.split("/")[0] in PACKAGES}
        wanted = code_closure(module, root)
        missing, extra = sorted(wanted - declared), sorted(declared - wanted)
        if missing or extra:
            problems[name] = {"missing": missing, "extra": extra}
    return problems


@pytest.fixture(scope="module")
def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_code_deps_equal_the_import_closure(dvc_yaml):
    assert dep_mismatches(dvc_yaml) == {}


def test_a_planted_missing_or_extra_dep_is_caught(dvc_yaml):
    name, (module, _) = next((n, c) for n, c in stage_commands(dvc_yaml).items() if n == "dump")
    honest = sorted(code_closure(module))
    stage = {"cmd": f"python -m {module}", "deps": honest}
    assert dep_mismatches({"stages": {name: stage}}) == {}
    without = [d for d in honest if d != "arca/credit/signals.py"]
    assert dep_mismatches({"stages": {name: {**stage, "deps": without}}})[name] == {
        "missing": ["arca/credit/signals.py"],
        "extra": [],
    }
    unused = "arca/analysis/heatmap.py"  # only the figures stage runs it
    assert dep_mismatches({"stages": {name: {**stage, "deps": [*honest, unused]}}})[name]["extra"] == [unused]


def test_closure_follows_lazy_and_from_package_imports(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "arca").mkdir()
    (tmp_path / "stages" / "s.py").write_text("def f():\n    from arca import a\n")
    (tmp_path / "arca" / "a.py").write_text("import arca.b\n")
    (tmp_path / "arca" / "b.py").write_text("import os\n")
    assert code_closure("stages.s", tmp_path) == {"stages/s.py", "arca/a.py", "arca/b.py"}
