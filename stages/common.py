"""What every stage shares: reading params.yaml sections with errors that name the missing key."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import yaml


def run_id(method: str, rank: int, seed: int) -> str:
    """`<method>-r<rank>-s<seed>`; `method` is the run's label (`arca_perm` for a permuted ARCA run)."""
    return f"{method}-r{rank}-s{seed}"


def parse_run_id(run: str) -> tuple[str, int, int]:
    """`(method label, rank, seed)` of a run id, the inverse of `run_id` (`arca_perm-r8-s0` -> `("arca_perm", 8,
    0)`). The params schema guarantees every key of `study.runs` has this form."""
    match = re.fullmatch(r"(\w+)-r(\d+)-s(\d+)", run)
    if match is None:
        raise ValueError(f"run id {run!r} is not <method>-r<rank>-s<seed> (a key of study.runs)")
    return match.group(1), int(match.group(2)), int(match.group(3))


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def section(params: dict[str, Any], key: str) -> dict[str, Any]:
    """`params[key]` as a dict; the error names the params.yaml key and the fix."""
    value = params.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"params.yaml: section `{key}:` is missing or not a mapping; add it (see README)")
    return value


def require(mapping: dict[str, Any], dotted: str, kind: type | tuple[type, ...], *, positive: bool = False) -> Any:
    """Read `a.b.c` from nested params, checking type (and > 0 when `positive`)."""
    value: Any = mapping
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"params.yaml: {dotted} is missing; add it (see README)")
        value = value[part]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ValueError(f"params.yaml: {dotted} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ValueError(f"params.yaml: {dotted} must be {_kind_name(kind)}, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"params.yaml: {dotted} must be > 0, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def check_layer(layer: int, num_hidden_layers: int, key: str) -> None:
    """ARCA's `hidden_states` index must exist in the model: -(L + 1) .. L for L decoder layers."""
    if not -(num_hidden_layers + 1) <= layer <= num_hidden_layers:
        raise ValueError(
            f"params.yaml: `{key}`: must be in [-{num_hidden_layers + 1}, {num_hidden_layers}] (hidden_states of "
            f"this {num_hidden_layers}-layer model; -1 = final), got {layer}"
        )


ENGINES = ("hf", "vllm")  # sampling engines of the dump and evaluate stages (`<section>.engine`)


def check_engine(params: dict[str, Any], key: str) -> str:
    """`params[key].engine` (default `hf`), checked: `vllm` must be importable (the `[vllm]` extra, a CUDA GPU)."""
    engine = section(params, key).get("engine", "hf")
    if engine not in ENGINES:
        raise ValueError(f"params.yaml: {key}.engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError(f"params.yaml: {key}.engine: vllm is not installed; pip install '.[vllm]' or set it to hf")
    return engine
