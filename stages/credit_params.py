"""The credit config of a run from params.yaml, for the stages that train, dump or diagnose with it (kept apart
from `stages.common` so that stages which never read credit do not depend on the credit code)."""

from __future__ import annotations

from typing import Any

from arca.credit_config import CreditConfig, CreditConfigError
from stages.common import section

KEYS = ("scheme", "tau", "mix", "w_max", "layer", "eps", "top_entropy_quantile", "sharpening", "reference")
KEYS += ("salience_dropout",)
FLOATS = ("tau", "mix", "w_max", "eps", "top_entropy_quantile", "sharpening")


def credit_config(params: dict[str, Any], method: str) -> CreditConfig:
    """The run's `CreditConfig` from params.yaml `credit:` (validated; errors name the params key)."""
    credit = section(params, "credit")
    values = {k: _number(credit[k]) if k in FLOATS else credit[k] for k in KEYS if k in credit}
    try:
        return CreditConfig(method=method, **values)
    except CreditConfigError as err:
        key = "study.runs.<run>.method" if err.field == "method" else f"credit.{err.field}"
        raise err.renamed(f"params.yaml: {key}") from None


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-8` as a string: accept numeric strings, leave anything else for the validator."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
