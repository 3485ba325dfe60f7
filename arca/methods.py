"""The one table of credit methods (SPEC 2-4): name, what its salience needs, which credit fields its training
reads, its color, in SPEC order. Torch-free, so the params schema, the figures, the trainer, the signal registry
and conf/credit_methods/ (rendered from it, `credit_methods_conf`) all read this table instead of a copy.

Imports: the standard library only (the base layer of `arca`).
"""

from __future__ import annotations

from dataclasses import dataclass

# Normalization within a trajectory (SPEC 3), the degenerate-row rule and how the trainer gets the adapter-off
# states (SPEC 2b): `matched` recomputes them on exactly the loss micro-batch (exact, the default); `reuse` takes
# TRL's generation-time reference pass as it is (other batch composition: cheaper, not exact).
SCHEMES: tuple[str, ...] = ("mean", "softmax", "rank")
FALLBACKS: tuple[str, ...] = ("raw_mean", "sharpened_sum")
REFERENCE_MODES: tuple[str, ...] = ("matched", "reuse")
# A run with the permutation control (SPEC 3 `permute`) is its own method in run ids, dumps, tables and
# figures: `<method>_perm` (`arca_perm-r8-s0`).
PERMUTED_SUFFIX = "_perm"

# The `CreditConfig` fields every normalized salience reads; reference-comparing signals also choose their
# adapter-off pass, only `arca` reads a hidden-state layer, only `top_entropy` its quantile. A train cell gets
# exactly its method's fields, so a change to one retrains only the methods that read it.
NORMALIZATION: tuple[str, ...] = ("scheme", "tau", "mix", "w_max", "eps", "sharpening", "fallback", "salience_dropout")


@dataclass(frozen=True)
class Method:
    """One credit method.

    Args:
        name: the params value (`credit.methods.<name>`, `study.runs.<id>.method`).
        fields: the `CreditConfig` fields its training reads.
        color: its hue in every figure, a permuted run's a lighter shade of it; None: the figures' spare palette.
        signal: a SPEC 2 salience, dumped as `w_<name>` (`top_entropy` is TRL's entropy mask: trained, not dumped).
        needs_reference: its salience needs the adapter-off pass. needs_logits: vocab-level statistics (the LM
            head). needs_lora: the LoRA modules' own outputs (hooks on the adapter-on pass).
    """

    name: str
    fields: tuple[str, ...]
    color: str | None
    signal: bool = True
    needs_reference: bool = False
    needs_logits: bool = False
    needs_lora: bool = False


_REFERENCE = (*NORMALIZATION, "reference")
# Paired hues: the paper's variant of a signal is a shade of the exact one it mirrors (kl / divergence,
# entropy_reduction / entropy_drop, arca / arca_local), so the pairs read as pairs.
TABLE: tuple[Method, ...] = (
    Method("uniform", (), "#7f7f7f"),
    Method("surprisal", NORMALIZATION, "#1f77b4", needs_logits=True),
    Method("entropy", NORMALIZATION, "#2ca02c", needs_logits=True),
    Method("entropy_reduction", _REFERENCE, "#9467bd", needs_reference=True, needs_logits=True),
    Method("kl", _REFERENCE, "#ff7f0e", needs_reference=True, needs_logits=True),
    Method("arca", (*_REFERENCE, "layer"), "#d62728", needs_reference=True),
    Method("top_entropy", (*NORMALIZATION, "top_entropy_quantile"), None, signal=False, needs_logits=True),
    Method("divergence", _REFERENCE, "#ffbb78", needs_reference=True, needs_logits=True),
    Method("entropy_drop", NORMALIZATION, "#c5b0d5", needs_logits=True),
    Method("arca_local", NORMALIZATION, "#8c1515", needs_lora=True),
)
BY_NAME: dict[str, Method] = {m.name: m for m in TABLE}
METHODS: tuple[str, ...] = tuple(m.name for m in TABLE)  # what a run can train with
SIGNAL_NAMES: tuple[str, ...] = tuple(m.name for m in TABLE if m.signal)  # what a dump scores, SPEC 2 order
METHOD_FIELDS: dict[str, tuple[str, ...]] = {m.name: m.fields for m in TABLE}


def run_method(method: str, permute: bool) -> str:
    """The method label of a run: `method`, or `method + PERMUTED_SUFFIX` for a permuted run (`arca_perm`)."""
    return f"{method}{PERMUTED_SUFFIX}" if permute else method


def split_run_method(label: str) -> tuple[str, bool]:
    """`(method, permute)` of a run's method label (`arca_perm` -> `("arca", True)`), the inverse of
    `run_method`; a label that is neither a method nor a permuted one raises."""
    method = label.removesuffix(PERMUTED_SUFFIX)
    permute = method != label
    if method not in METHODS or (permute and method == "uniform"):
        raise ValueError(f"method: {label!r} is not a method of {', '.join(METHODS)} nor <method>{PERMUTED_SUFFIX}")
    return method, permute


def credit_methods_conf() -> str:
    """conf/credit_methods/default.yaml: each method's block, its fields copied from the shared `credit:` keys
    by interpolation when DVC composes params.yaml (a test keeps the file equal to this)."""
    lines = [
        "# @package credit.methods",
        "# What each method's train cell reads: the shared `credit:` keys of the profile, copied per method by Hydra",
        "# interpolation when DVC composes params.yaml. dvc.yaml gives train@<run> only `credit.methods.<method>`, so",
        "# `-S credit.layer=-2` retrains only ARCA runs and `-S credit.sharpening=2` no uniform run. A profile may set",
        "# one method's key apart (`credit.methods.arca.layer: -2`). Rendered from arca/methods.py",
        "# (`python -m arca.methods > conf/credit_methods/default.yaml`; a test keeps them equal).",
    ]
    for m in TABLE:
        lines.append(f"{m.name}:" + ("" if m.fields else " {}"))
        lines += [f"  {k}: ${{credit.{k}}}" for k in m.fields]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(credit_methods_conf(), end="")
