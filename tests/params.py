"""The committed params.yaml (the embedded profile) with some sections changed: every stage validates the whole
file first, so a stage test writes a complete, valid params file, not just the sections the stage reads."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def merged(base: dict, override: dict) -> dict:
    """`base` with `override` merged in, mapping by mapping (lists and values replaced)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def default_params(override: dict[str, Any] | None = None) -> dict[str, Any]:
    """A fresh copy of the committed params.yaml with `override` merged in (`study.runs` replaced whole when
    given: a test's runs are its own cells, not added to the default's)."""
    params = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    override = override or {}
    out = merged(params, override)
    if "runs" in override.get("study", {}):
        out["study"] = {**out["study"], "runs": copy.deepcopy(override["study"]["runs"])}
    return out
