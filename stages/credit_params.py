"""The credit config of a run from params.yaml, for the stages that train, dump or diagnose with it (kept apart
from `stages.common` so that stages which never read credit do not depend on the credit code)."""

from __future__ import annotations

from typing import Any

from arca.credit_config import CreditConfig
from stages.common import section


def credit_config(params: dict[str, Any], method: str):
    """The run's `CreditConfig` from params.yaml `credit:` (validated)."""
    credit = section(params, "credit")
    keys = ("scheme", "tau", "mix", "w_max", "layer", "eps", "top_entropy_quantile", "sharpening", "reference")
    keys += ("salience_dropout",)
    return CreditConfig(
        method=method,
        **{k: credit[k] for k in keys if k in credit},
    )
