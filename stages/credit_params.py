"""The credit config of a run from params.yaml, for the stages that train, dump or diagnose with it (kept apart
from `stages.common` so that stages which never read credit do not depend on the credit code).

A train cell reads only its method's block, `credit.methods.<method>` (the fields `METHOD_FIELDS` names, which
conf/credit_methods/ copies from the shared keys), so dvc.yaml can give it exactly that block: a change to
`credit.layer` retrains only ARCA runs. The analysis stages (dump, diagnose) score every signal on the same
rollouts and read the shared keys, `credit.<key>`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from arca.credit.config import METHOD_FIELDS, CreditConfig, CreditConfigError, split_run_method
from stages.common import section
from stages.schema import Params

KEYS = ("scheme", "tau", "mix", "w_max", "layer", "eps", "top_entropy_quantile", "sharpening", "reference")
KEYS += ("salience_dropout", "fallback")
FLOATS = ("tau", "mix", "w_max", "eps", "top_entropy_quantile", "sharpening")


def credit_config(params: dict[str, Any], method: str) -> CreditConfig:
    """The shared `credit:` keys as `method`'s `CreditConfig` (validated; errors name the params key). `method`
    may be a run's method label as dumps and budget.json write it: `arca_perm` (SPEC 3's permutation control)
    gives ARCA's config with `permute` set, so every stage that looks a dumped method up gets its signal's."""
    credit = section(params, "credit")
    try:
        signal, permute = split_run_method(method)
    except ValueError:
        signal, permute = method, False  # not a method: `_config` names the key and the choices
    config = _config(signal, {k: credit[k] for k in KEYS if k in credit}, "credit")
    return replace(config, permute=True) if permute else config


def method_credit_config(params: Params, method: str) -> CreditConfig:
    """What a train cell of `method` reads: `credit.methods.<method>` as the schema typed it, exactly the fields
    the method uses (the keys the block sets; the schema has checked their values)."""
    if method not in METHOD_FIELDS:
        return _config(method, {}, "credit")  # the unknown-method error
    block = params.credit.methods.get(method)
    if block is None:
        raise ValueError(
            f"params.yaml: credit.methods.{method} is missing; params.yaml is composed from conf/ (make params)"
        )
    values = block.model_dump(exclude_unset=True)
    extra = sorted(set(values) - set(METHOD_FIELDS[method]))
    if extra:
        raise ValueError(f"params.yaml: credit.methods.{method}.{extra[0]}: {method} does not read it; remove it")
    return _config(method, values, f"credit.methods.{method}")


def _config(method: str, values: dict[str, Any], prefix: str) -> CreditConfig:
    values = {k: _number(v) if k in FLOATS else v for k, v in values.items()}
    try:
        return CreditConfig(method=method, **values)
    except CreditConfigError as err:
        key = "study.runs.<run>.method" if err.field == "method" else f"{prefix}.{err.field}"
        raise err.renamed(f"params.yaml: {key}") from None


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-8` as a string: accept numeric strings, leave anything else for the validator."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
