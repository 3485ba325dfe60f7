"""The machinery of the params schema: strict pydantic models whose errors name the dotted params key and the
fix, and a read-only view of the validated params that lets a stage read only the keys dvc.yaml declares for
it (so DVC can never miss a param a stage reads)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """A params section: unknown keys are errors, values are validated, the result is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class ParamsError(ValueError):
    """A params.yaml problem, one line per offending key: `params.yaml: <dotted.key>: <what is wrong and the fix>`."""


def describe(error: ValidationError, model: type[BaseModel], source: str = "params.yaml") -> ParamsError:
    """Turn pydantic's errors into lines that name the dotted key, and the closest valid key for a typo."""
    lines = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"] if not str(part).startswith("function-")]
        dotted = ".".join(loc)
        if item["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
            hint = f"did you mean `{'.'.join([*loc[:-1], close[0]])}`?" if close else f"valid keys: {', '.join(valid)}"
            lines.append(f"{source}: `{dotted}`: unknown key; {hint}")
        elif item["type"] == "missing":
            lines.append(f"{source}: `{dotted}` is missing; add it (see README)")
        else:
            message = item["msg"].removeprefix("Value error, ")
            value = item.get("input")
            got = "" if isinstance(value, (dict, list)) else f", got {value!r}"  # a section-level check
            lines.append(f"{source}: `{dotted}`: {message}{got}" if dotted else f"{source}: {message}")
    return ParamsError("\n".join(lines))


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The field names of the (nested) model at `loc`, for did-you-mean hints; [] where it is not a model."""
    current: Any = model
    keyed = False  # the previous field was a dict of models: this part is a key (a run id), not a field
    for part in loc:
        if keyed:
            keyed = False
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        keyed = getattr(field.annotation, "__origin__", None) is dict
        current = _model_in(field.annotation)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


class ParamsView(Mapping[str, Any]):
    """Plain-dict params restricted to declared dotted keys: reading anything else is an error that says to
    declare it in dvc.yaml. `seen` records every key read, for tests.

    Args:
        data: the validated params as plain values. declared: dotted keys (a key covers its whole subtree).
    """

    def __init__(self, data: Mapping[str, Any], declared: Iterable[str], prefix: str = ""):
        self._data, self._declared, self._prefix = data, tuple(declared), prefix
        self.seen: set[str] = set()

    def _allowed(self, dotted: str) -> bool:
        return any(dotted == d or dotted.startswith(d + ".") or d.startswith(dotted + ".") for d in self._declared)

    def __getitem__(self, key: str) -> Any:
        dotted = f"{self._prefix}{key}"
        if not self._allowed(dotted):
            raise KeyError(
                f"params key `{dotted}` is read but not declared for this stage: add it to its dvc.yaml params"
            )
        value = self._data[key]
        covered = any(dotted == d or dotted.startswith(d + ".") for d in self._declared)
        if isinstance(value, Mapping) and not covered:
            view = ParamsView(value, self._declared, dotted + ".")
            view.seen = self.seen
            return view
        self.seen.add(dotted)
        return value

    def __iter__(self):
        return (k for k in self._data if self._allowed(f"{self._prefix}{k}"))

    def __len__(self) -> int:
        return sum(1 for _ in self)
