"""What a run's resume state must match before a checkpoint is resumed: the settings, the credit, the reward
functions and the code. The code is the import closure of the training entry point (`arca.run.training`),
computed from the source (every `import` of an `arca` module, function-level ones included), so a change to any
module training runs through (the dtype logic of `arca.models` included) starts the run over instead of resuming
a checkpoint written by the old code; no module list is kept by hand.

Imports: the standard library only (called by `arca.run.training`).
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

TRAINING_ENTRY = "arca.run.training"
# The built-in graders' functions are named by their module path of before the layered layout (`arca.grading`), so
# the settings hash of a run (budget.json `params_md5`, copied into every dump) does not move when code moves.
BUILTIN_REWARDS = ("accuracy_reward", "exact_accuracy_reward")
REWARD_MODULE = "arca.tasks.grading"


def reward_id(fn: Callable) -> str:
    """A reward function's name in the settings hash: `arca.grading.<name>` for a built-in grader, else
    `<module>.<qualname>`."""
    if fn.__module__ == REWARD_MODULE and fn.__qualname__ in BUILTIN_REWARDS:
        return f"arca.grading.{fn.__qualname__}"
    return f"{fn.__module__}.{fn.__qualname__}"


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # arca/


def _source(module: str) -> Path | None:
    """The file of an `arca` module (`arca.x.y` -> arca/x/y.py or arca/x/y/__init__.py), read from the tree without
    importing it; None for a name that is no module (a class or function imported from one)."""
    parts = module.split(".")[1:]
    base = PACKAGE_DIR.joinpath(*parts)
    for path in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if path is not None and path.is_file():
            return path
    return None


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:` (imports for type checkers only never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo += node.orelse
            continue
        todo += ast.iter_child_nodes(node)


def _arca_imports(path: Path) -> set[str]:
    """The `arca` modules `path` imports (`from arca.x import y` counts `arca.x.y` when that is a module)."""
    names = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        names |= {name for name in found if name.split(".")[0] == "arca" and _source(name) is not None}
    return names


def import_closure(entry: str = TRAINING_ENTRY) -> tuple[str, ...]:
    """Every `arca` module `entry` reaches through imports, itself and the packages on the way included, sorted."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a/__init__, a/b/__init__
        source = _source(module)
        if source is not None:
            todo += sorted(_arca_imports(source) - seen)
    return tuple(sorted(seen))


def source_md5(module: str) -> str:
    source = _source(module)
    return hashlib.md5(source.read_bytes()).hexdigest() if source is not None else "unknown"


def run_fingerprint(
    settings: Any, credit: Any, reward_funcs: Sequence[Callable], code: Sequence[str] | None = None
) -> dict:
    """Everything that shapes the trained adapter (not `output_dir`), as plain JSON values.

    Args:
        settings, credit: the run's `TrainSettings` and `CreditConfig` (dataclasses).
        reward_funcs: its reward functions. code: the modules whose source is hashed; None: `import_closure()`.
    """
    settings_fields = {k: v for k, v in asdict(settings).items() if k not in ("output_dir", "checkpoint_dir")}
    rewards = [reward_id(f) for f in reward_funcs]
    # DVC reruns the stage when one of these modules changes, and resuming a checkpoint written by the old code
    # would hand back the old adapter.
    hashes = {name: source_md5(name) for name in (import_closure() if code is None else code)}
    fingerprint = {"settings": settings_fields, "credit": asdict(credit), "rewards": rewards, "code": hashes}
    return json.loads(json.dumps(fingerprint, default=str))


def settings_md5(fingerprint: dict) -> str:
    """md5 of a `run_fingerprint` without its code hashes: the run's settings, credit and reward functions.
    budget.json records it (and dumps copy it), so a code change that retrains to the same adapter reruns nothing
    downstream, while two runs with equal budget.json were trained under equal settings."""
    run = {k: v for k, v in fingerprint.items() if k != "code"}
    return hashlib.md5(json.dumps(run, sort_keys=True).encode()).hexdigest()
