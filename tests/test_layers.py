"""The house rules of `arca/`: every module sits in a room whose docstring says what it may import, no room imports
a room above it, TRL is imported only in `arca/grpo/`, and the rooms meant to be torch-free stay so. Imports are
read from the source (every `import` statement, function-level ones included), so a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCA = ROOT / "arca"
BASE = {"methods", "choices", "io", "progress"}
# Room -> the rooms it may import (besides itself and the base modules).
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "tasks": set(),
    "credit": set(),
    "models": set(),
    "sampling": {"credit", "tasks", "models"},
    "analysis": {"credit", "tasks"},
    "grpo": {"credit", "tasks", "sampling"},
    "run": {"grpo", "credit", "tasks", "sampling", "models"},
    "inspect": {"sampling", "analysis", "credit", "tasks", "models"},  # `arca inspect`: both halves of the pipeline
}
TORCH_FREE = {"base", "tasks"}
THIRD_PARTY_ROOMS = {"trl": {"grpo"}}  # a package -> the only rooms that may import it


def _room(module: str) -> str:
    """`arca.credit.signals` -> `credit`; `arca.methods` -> `base`; the package itself -> `package`."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return "base" if parts[1] in BASE else parts[1]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ARCA.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


MODULES = _modules()


def test_every_module_sits_in_a_known_room():
    rooms = {_room(m) for m in MODULES}
    assert rooms <= {*ALLOWED, "package"}, rooms - {*ALLOWED, "package"}
    for room in set(ALLOWED) - {"base"}:
        doc = ast.get_docstring(ast.parse((ARCA / room / "__init__.py").read_text()))
        assert doc and "Imports:" in doc, f"arca/{room}/__init__.py must state its purpose and import rule"


@pytest.mark.parametrize("module", [m for m in MODULES if _room(m) != "package"])
def test_no_upward_imports(module):
    room = _room(module)
    for name in _imports(MODULES[module]):
        if name.split(".")[0] != "arca" or name == "arca":
            continue
        target = _room(name)
        assert target in {room, "base"} | ALLOWED[room], f"{module} (room {room}) imports {name} (room {target})"


@pytest.mark.parametrize("module", [m for m in MODULES if _room(m) != "package"])
def test_third_party_rules(module):
    room, top = _room(module), {n.split(".")[0] for n in _imports(MODULES[module])}
    for package, rooms in THIRD_PARTY_ROOMS.items():
        assert package not in top or room in rooms, f"{module} imports {package}; only arca/{'|'.join(rooms)} may"
    if room in TORCH_FREE:
        assert not top & {"torch", "transformers", "peft", "trl"}, f"{module} must stay torch-free"


def test_the_rules_catch_an_upward_import(tmp_path):
    """The checker itself: a credit module importing the trainer is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from arca.grpo.trainer import CreditGRPOTrainer\n")
    assert "arca.grpo.trainer" in _imports(bad) and _room("arca.grpo.trainer") not in ALLOWED["credit"]


def test_public_surface():
    import arca

    for name in ("CreditGRPOTrainer", "CreditGRPOConfig", "compute_signals", "normalize", "gini"):
        assert name in arca.__all__ and getattr(arca, name) is not None
    for name in ("effective_token_ratio", "math_reward", "METHODS", "CreditConfig", "accuracy_reward"):
        assert name in arca.__all__ and getattr(arca, name) is not None
    assert arca.math_reward("\\boxed{\\frac{1}{2}}", "0.5") == 1.0
