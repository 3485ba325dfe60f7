"""Raw per-token salience signals (SPEC section 2) from at most two no-grad passes: adapter on and off.

Every vocab-level statistic is computed once, in float32 chunks over the valid tokens only
(`arca.credit.vocab.vocab_stats`); a signal in the registry is then a cheap per-token map of those statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import Tensor

from arca.credit.lora_local import capture_lora_norms
from arca.credit.vocab import LogitMap, flat, float_head, logit_map, no_gather, vocab_stats
from arca.methods import BY_NAME, SIGNAL_NAMES

# SIGNAL_NAMES: the dumped signals in SPEC 2 order, and what each needs, from arca.methods (the one table).
# The vocab-level statistics (`vocab_stats`): per side, then the exact KL, which needs both full distributions.
POLICY_STATS: tuple[str, ...] = ("logp", "entropy")
REF_STATS: tuple[str, ...] = ("ref_logp", "ref_entropy")
VOCAB_STATS: tuple[str, ...] = (*POLICY_STATS, *REF_STATS, "kl")


class TokenStats(dict):
    """name -> (N,) float32 statistic over the N valid tokens, flattened in row-major (B, T) order.

    Keys: `valid` (always 1), `row` (the token's row in the batch, long), `logp` (log pi_theta(y_t)),
    `ref_logp`, `entropy`, `ref_entropy`, `kl`, `residual_norm` (||h_theta - h_ref||_2) and `lora_norm`
    (sum over LoRA modules of ||s B A x||_2). A signal that needs a new vocab-level statistic adds it in
    `arca.credit.vocab.vocab_stats`, so the vocabulary is still swept once.
    """

    def __missing__(self, key: str) -> Tensor:
        # Logit statistics are checked up front; the state-based ones can still be missing.
        sources = {"residual_norm": "ref_hidden (or ref_arca_hidden)", "lora_norm": "lora_norms"}
        raise ValueError(f"{sources.get(key, 'the states it comes from')}: needed for statistic {key!r}, not computed")


@dataclass(frozen=True)
class Signal:
    fn: Callable[[TokenStats], Tensor]  # stats -> (N,) salience
    needs_reference: bool  # needs the adapter-off pass
    needs_logits: bool  # needs vocab-level statistics (the LM head)
    needs_lora: bool = False  # needs the LoRA modules' own outputs (hooks on the adapter-on pass)
    reads: tuple[str, ...] = VOCAB_STATS  # the vocab-level statistics `fn` reads (what the sweep must produce)


SIGNALS: dict[str, Signal] = {}


def register_signal(
    name: str,
    *,
    needs_reference: bool | None = None,
    needs_logits: bool | None = None,
    needs_lora: bool | None = None,
    reads: tuple[str, ...] | None = None,
):
    """Decorator: register `fn(stats: TokenStats) -> Tensor (N,)` under `name`. What the signal needs comes from
    its row of `arca.methods.TABLE`; a signal outside the table (an experiment) states it here. `reads`: the
    vocab-level statistics among `VOCAB_STATS` it reads (default: its side's, both sides' and `kl` if it needs
    the reference), so statistics given from elsewhere
    (TRL's loss forward) spare the sweep of a side no signal still needs."""
    unknown = set(reads or ()) - set(VOCAB_STATS)
    if unknown:
        raise ValueError(f"register_signal({name!r}): reads {sorted(unknown)} not among {VOCAB_STATS}")
    row = BY_NAME.get(name)
    needs = {"needs_reference": needs_reference, "needs_logits": needs_logits, "needs_lora": needs_lora}
    for key, value in needs.items():
        if value is None:
            if row is None and key != "needs_lora":
                raise ValueError(f"register_signal({name!r}): not in arca.methods.TABLE, so give {key}")
            needs[key] = getattr(row, key) if row is not None else False

    def decorator(fn: Callable[[TokenStats], Tensor]) -> Callable[[TokenStats], Tensor]:
        default = VOCAB_STATS if needs["needs_reference"] else POLICY_STATS
        read = (default if reads is None else reads) if needs["needs_logits"] else ()
        SIGNALS[name] = Signal(fn, **needs, reads=read)
        return fn

    return decorator


@register_signal("uniform")
def uniform(stats: TokenStats) -> Tensor:
    return stats["valid"].clone()


@register_signal("surprisal", reads=("logp",))
def surprisal(stats: TokenStats) -> Tensor:
    return -stats["logp"]


@register_signal("entropy", reads=("entropy",))
def entropy(stats: TokenStats) -> Tensor:
    return stats["entropy"]


@register_signal("entropy_reduction", reads=("entropy", "ref_entropy"))
def entropy_reduction(stats: TokenStats) -> Tensor:
    return (stats["ref_entropy"] - stats["entropy"]).clamp_min(0.0)


@register_signal("kl", reads=("kl",))
def kl(stats: TokenStats) -> Tensor:
    return stats["kl"]


@register_signal("arca")
def arca(stats: TokenStats) -> Tensor:
    return stats["residual_norm"]


@register_signal("divergence", reads=("logp", "ref_logp"))
def divergence(stats: TokenStats) -> Tensor:
    """The paper's policy divergence: |log pi_theta(y_t) - log pi_ref(y_t)| of the sampled token only."""
    return (stats["logp"] - stats["ref_logp"]).abs()


@register_signal("entropy_drop", reads=("entropy",))
def entropy_drop(stats: TokenStats) -> Tensor:
    """The paper's temporal entropy reduction max(H_t - H_t+1, 0) along the completion; 0 on a row's last
    valid token (t + 1 is the next valid token of the same row)."""
    h, row = stats["entropy"], stats["row"]  # (N,), (N,) in row-major order
    drop = torch.zeros_like(h)
    same_row = row[1:] == row[:-1]  # (N - 1,)
    drop[:-1] = torch.where(same_row, (h[:-1] - h[1:]).clamp_min(0.0), 0.0)
    return drop


@register_signal("arca_local")
def arca_local(stats: TokenStats) -> Tensor:
    return stats["lora_norm"]


def _lookup(names: Iterable[str]) -> list[Signal]:
    names = list(names)
    unknown = [n for n in names if n not in SIGNALS]
    if unknown:
        raise ValueError(f"names: unknown signal(s) {unknown}; registered: {sorted(SIGNALS)}")
    return [SIGNALS[n] for n in names]


def needs_reference(names: Iterable[str]) -> bool:
    """True if any named signal needs the adapter-off pass."""
    return any(s.needs_reference for s in _lookup(names))


def needs_logits(names: Iterable[str]) -> bool:
    """True if any named signal needs vocab-level statistics."""
    return any(s.needs_logits for s in _lookup(names))


def needs_lora(names: Iterable[str]) -> bool:
    """True if any named signal needs the LoRA modules' own outputs (`arca_local`)."""
    return any(s.needs_lora for s in _lookup(names))


def signals_read(names: Iterable[str]) -> set[str]:
    """The vocab-level statistics (`VOCAB_STATS`) the named signals read."""
    return {stat for s in _lookup(names) for stat in s.reads}


def precision_sensitive(names: Iterable[str]) -> list[str]:
    """The named signals whose value in a low-precision run must be checked against float32 (SPEC 2b): every
    reference-comparing signal, plus `arca_local` (no cancellation, but it reads low-precision activations)."""
    names = list(names)
    return [n for n, s in zip(names, _lookup(names)) if s.needs_reference or s.needs_lora]


def _validate(
    target_ids: Tensor,
    mask: Tensor,
    states: dict[str, Tensor | None],
    names: Sequence[str],
    temperature: float,
    chunk_tokens: int,
) -> list[Signal]:
    if target_ids.dim() != 2:
        raise ValueError(f"target_ids: shape {tuple(target_ids.shape)} must be (B, T)")
    if mask.shape != target_ids.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match target_ids {tuple(target_ids.shape)}")
    for arg, x in states.items():
        if x is not None and (x.dim() != 3 or x.shape[:2] != target_ids.shape):
            raise ValueError(f"{arg}: shape {tuple(x.shape)} must be (B, T, *) with (B, T) = {tuple(mask.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: must be >= 1, got {chunk_tokens}")
    for kind in ("hidden", "logits", "arca_hidden"):
        policy, ref = states[f"policy_{kind}"], states[f"ref_{kind}"]
        if policy is not None and ref is not None and policy.shape != ref.shape:
            raise ValueError(f"ref_{kind}: shape {tuple(ref.shape)} does not match policy_{kind} {tuple(policy.shape)}")
        if kind == "arca_hidden" and (policy is None) != (ref is None):
            raise ValueError(
                f"{'ref' if ref is None else 'policy'}_arca_hidden: pass both ARCA-layer states or neither"
            )
    signals = _lookup(names)
    refs = ("ref_hidden", "ref_logits", "ref_arca_hidden")
    if any(s.needs_reference for s in signals) and all(states[a] is None for a in refs):
        raise ValueError(f"ref_hidden: signals {list(names)} need adapter-off states: pass one of {refs}")
    return signals


def _vocab_sides(
    signals: list[Signal],
    names: Sequence[str],
    lm_head: torch.nn.Module | None,
    states: dict[str, Tensor | None],
    given: Mapping[str, Tensor],
    n: int,
    gather_head: Callable[..., AbstractContextManager],
) -> list[tuple[Tensor, tuple | None] | None]:
    """Which (states, head) pairs the vocab sweep needs: none, policy, reference or both (`vocab_stats`' sides).
    A side is swept when a signal reads one of its statistics that is not `given`; `kl` needs both."""
    reads = {stat for s in signals for stat in s.reads}
    if "kl" in reads:
        wanted = {"policy", "ref"}
    else:
        missing = reads - set(given)
        wanted = {side for side, keys in (("policy", POLICY_STATS), ("ref", REF_STATS)) if missing & set(keys)}
    if not wanted:
        return []
    head = None  # the float32 copy of the head weight is made once, and only if hidden states need it
    if any(states[f"{side}_logits"] is None for side in wanted):
        if lm_head is None:
            raise ValueError(f"lm_head: signals {list(names)} need it to map hidden states to logits")
        head = float_head(lm_head, gather_head)
    sides: list[tuple[Tensor, tuple | None] | None] = []
    for side in ("policy", "ref"):
        logits, hidden = states[f"{side}_logits"], states[f"{side}_hidden"]
        if side not in wanted:
            sides.append(None)
        elif logits is None and hidden is None:
            raise ValueError(f"{side}_hidden: signals {list(names)} need it (or {side}_logits)")
        else:
            sides.append((flat(logits, n), None) if logits is not None else (flat(hidden, n), head))
    return sides if sides[1] is not None else sides[:1]


@torch.no_grad()
def signals_from_states(
    target_ids: Tensor,
    mask: Tensor,
    policy_hidden: Tensor | None,
    lm_head: torch.nn.Module | None,
    ref_hidden: Tensor | None = None,
    *,
    policy_arca_hidden: Tensor | None = None,
    ref_arca_hidden: Tensor | None = None,
    policy_logits: Tensor | None = None,
    ref_logits: Tensor | None = None,
    lora_norms: Tensor | None = None,
    to_logits: LogitMap = LogitMap(),
    names: Sequence[str] = SIGNAL_NAMES,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    gather_head: Callable[..., AbstractContextManager] = no_gather,
    given: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Signals from states already aligned with their tokens; inputs are detached, so hooked states are fine.

    Args:
        target_ids: (B, T) ids of the scored tokens. mask: (B, T), 1 on valid tokens, 0 on padding.
        policy_hidden, ref_hidden: (B, T, H) final (post-norm) hidden states with the adapter on / off, at
            the positions whose logits predict `target_ids`.
        lm_head: H -> V module; its weight is used in float32.
        policy_arca_hidden, ref_arca_hidden: (B, T, H) states at the ARCA layer (default: the final ones).
        policy_logits, ref_logits: (B, T, V), used instead of hidden states + `lm_head` when given.
        to_logits: what the model applies to `lm_head(h)` (scale, softcapping; see `logit_map`).
        lora_norms: (B, T) float32 sum over LoRA modules of ||s B A x||_2 (`arca.credit.lora_local`), for `arca_local`.
        names: registered signals to return. temperature: logits are divided by it before the softmax.
        chunk_tokens: valid tokens per float32 chunk; peak extra memory is a few x chunk_tokens x V x 4 bytes.
        gather_head: `gather(weight, bias)`, a context inside which the head's weight is read whole (the trainer
            passes TRL's `maybe_gather_lm_head_ctx` for DeepSpeed ZeRO-3); default: none needed.
        given: (B, T) statistics computed elsewhere, by the same definition (`logp`, `entropy`: TRL's loss
            forward with a float32 head; `ref_logp`, `ref_entropy`: its adapter-off pass). A side of the vocab
            sweep whose statistics are all given is not swept; `kl` always sweeps both (it needs the full
            distributions), and a swept statistic is used over a given one.
    Returns:
        name -> (B, T) float32, exactly 0 where `mask` == 0.
    """
    states = {
        "policy_hidden": policy_hidden,
        "ref_hidden": ref_hidden,
        "policy_logits": policy_logits,
        "ref_logits": ref_logits,
        "policy_arca_hidden": policy_arca_hidden,
        "ref_arca_hidden": ref_arca_hidden,
    }
    signals = _validate(target_ids, mask, states, names, temperature, chunk_tokens)
    if lora_norms is not None and lora_norms.shape != target_ids.shape:
        raise ValueError(f"lora_norms: shape {tuple(lora_norms.shape)} must be (B, T) = {tuple(target_ids.shape)}")
    if lora_norms is None and any(s.needs_lora for s in signals):
        raise ValueError(f"lora_norms: signals {list(names)} need the LoRA modules' outputs (arca.credit.lora_local)")
    n = target_ids.numel()
    rows = mask.reshape(-1).nonzero().squeeze(1)  # (N,) padding is never gathered
    stats = TokenStats(
        valid=torch.ones(rows.numel(), dtype=torch.float32, device=mask.device),
        row=torch.div(rows, max(target_ids.shape[1], 1), rounding_mode="floor"),
    )
    if lora_norms is not None:
        stats["lora_norm"] = lora_norms.detach().reshape(-1)[rows].float()
    given = dict(given or {})
    for key, value in given.items():
        if key not in (*POLICY_STATS, *REF_STATS) or value.shape != target_ids.shape:
            raise ValueError(
                f"given: {key!r} must be one of {POLICY_STATS + REF_STATS} with shape (B, T) = "
                f"{tuple(target_ids.shape)}, got {tuple(value.shape)}"
            )
        stats[key] = value.detach().reshape(-1)[rows].float()
    sides = _vocab_sides(signals, names, lm_head, states, given, n, gather_head)
    if sides:
        stats.update(vocab_stats(sides, target_ids.reshape(-1), rows, temperature, chunk_tokens, to_logits))
    policy_arca = policy_arca_hidden if policy_arca_hidden is not None else policy_hidden
    ref_arca = ref_arca_hidden if ref_arca_hidden is not None else ref_hidden
    if any(s.needs_reference for s in signals) and policy_arca is not None and ref_arca is not None:
        delta = flat(policy_arca, n)[rows].float() - flat(ref_arca, n)[rows].float()  # (N, H)
        stats["residual_norm"] = torch.linalg.vector_norm(delta, dim=-1)  # (N,)
    result = {}
    for name, signal in zip(names, signals):
        values = torch.zeros(n, dtype=torch.float32, device=mask.device)  # (B*T,)
        values[rows] = signal.fn(stats).float()
        result[name] = values.reshape(target_ids.shape)  # (B, T)
    return result


def _final_and_layer(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, layer: int):
    """(final hidden state, hidden state at `layer` or None if that is the final one), each (B, L, H)."""
    # logits_to_keep=1: full (B, L, V) logits are never materialized; the chunk loop rebuilds them.
    hidden = model(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False, logits_to_keep=1
    ).hidden_states  # (num_layers + 1) x (B, L, H)
    if not -len(hidden) <= layer < len(hidden):
        raise ValueError(f"layer: {layer} is out of range for {len(hidden)} hidden states")
    return hidden[-1], None if layer % len(hidden) == len(hidden) - 1 else hidden[layer]


@torch.no_grad()
def compute_signals(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    layer: int = -1,
    names: Sequence[str] = SIGNAL_NAMES,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    gather_head: Callable[..., AbstractContextManager] = no_gather,
) -> dict[str, Tensor]:
    """Run the adapter-on pass (and the adapter-off pass under `disable_adapter()` if needed) and score tokens.

    Args:
        model: causal LM; a `peft.PeftModel` when a reference or LoRA signal is requested. Its passes run in eval
            mode (no dropout); every module's train/eval mode is restored afterwards.
        input_ids, attention_mask, completion_mask: (B, L); completion_mask is 1 on scored tokens.
        layer: index into HF `hidden_states` for ARCA (-1 = final, post-norm).
        names, temperature, chunk_tokens, gather_head: as in `signals_from_states`.
    Returns:
        name -> (B, L) float32; position j scores `input_ids[:, j]` from the states at j - 1, so
        position 0 and every position with completion_mask (or attention_mask) 0 is 0.
    """
    for arg, x in [("attention_mask", attention_mask), ("completion_mask", completion_mask)]:
        if input_ids.dim() != 2 or x.shape != input_ids.shape:
            raise ValueError(f"{arg}: shape {tuple(x.shape)} does not match input_ids {tuple(input_ids.shape)}")
    use_ref, use_lora = needs_reference(names), needs_lora(names)
    if (use_ref or use_lora) and not isinstance(model, PeftModel):
        raise ValueError(f"model: signals {list(names)} need the LoRA adapter; wrap it with peft.get_peft_model")
    policy = ref = (None, None)
    lora_norms = None
    if use_ref or use_lora or needs_logits(names):
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            with capture_lora_norms(model, input_ids.shape[1] - 1) if use_lora else nullcontext() as capture:
                policy = _final_and_layer(model, input_ids, attention_mask, layer)
            if use_lora:
                lora_norms = capture.norms()  # (B, L - 1), position j - 1 scores token j
            if use_ref:
                with model.disable_adapter():
                    ref = _final_and_layer(model, input_ids, attention_mask, layer)
        finally:
            for module, training in modes.items():
                module.training = training
    # States at j - 1 predict token j.
    policy_final, policy_arca, ref_final, ref_arca = (None if x is None else x[:, :-1] for x in (*policy, *ref))
    mask = (completion_mask[:, 1:] != 0) & (attention_mask[:, 1:] != 0)  # (B, L - 1)
    out = signals_from_states(
        input_ids[:, 1:],
        mask,
        policy_final,
        model.get_output_embeddings(),
        ref_final,
        policy_arca_hidden=policy_arca,
        ref_arca_hidden=ref_arca,
        lora_norms=lora_norms,
        to_logits=logit_map(model),
        names=names,
        temperature=temperature,
        chunk_tokens=chunk_tokens,
        gather_head=gather_head,
    )
    return {name: torch.nn.functional.pad(v, (1, 0)) for name, v in out.items()}  # (B, L)
