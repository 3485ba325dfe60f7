"""Expected peak memory of one training process, from the model's architecture and the run's settings: an
estimate for the planner (`make plan`), torch-free (plain numbers in, bytes out).

    peak = weights + lora_state + max(generation, training pass)

- weights = params x dtype bytes (`param_count`: embeddings, per layer q/k/v/o, gate/up/down, the RMSNorms and
  Qwen3's q/k norms, the final norm, an untied LM head).
- lora_state = LoRA params x 16 bytes: PEFT keeps the adapter in float32 (its `autocast_adapter_dtype`), plus
  its float32 gradient and AdamW's two float32 moments. LoRA params = sum over layers and targets of r x (in + out).
- generation = the KV cache of one generation batch, all of it at its longest: 2 (K, V) x layers x KV heads x
  head_dim x dtype bytes x rollouts x (prompt + completion length); TRL generates a whole optimizer step's
  rollouts (per process) in one batch.
- training pass = activations + head chunk + the method's extra, for one micro-batch of B rollouts x
  T = prompt + completion tokens:
  - activations, saved for the backward: without gradient checkpointing layers x B x T x dtype bytes x (16 H + 7
    Hq + 5 Hkv + 5 I) with LoRA dropout (H hidden, Hq = heads x head_dim, Hkv = KV heads x head_dim, I the MLP
    width: the inputs of every projection and of the activation, RMSNorm's float32 copies, SDPA's q/k/v/output,
    one dropout copy per adapted module's input), (13 H + 6 Hq + 5 Hkv + 4 I) without; with checkpointing one
    H-state per layer plus one layer's full set (recomputed in the backward).
  - head chunk: TRL's fused LM head projects at most 4,096 tokens x 32,768 vocabulary entries at a time into a
    float32 tile, and again in the backward: 2 x min(B x completion, 4096) x min(V, 32768) x 4 bytes.
  - method extra: `arca` holds one float32 (B, T, H) state per side (adapter on and off): 2 x B x T x H x 4;
    the reference-comparing logit signals sweep the vocabulary in float32 chunks of `chunk_tokens` valid tokens
    (`arca.credit.signals`, 1024), ~3 tensors of chunk x V per side swept: `kl` both sides, `entropy_reduction`
    and `divergence` the reference side (the policy's statistics come from TRL's loss forward); the other
    methods read what TRL's forward computed (`arca_local`'s hooks hold one r-vector per token and module).
    Counted on top of the training pass (an upper bound: the credit code runs before the loss forward and frees
    its temporaries, so bench/memory.py sees these extras only where they outgrow the loss's own peak).

Left out: the CUDA context and allocator slack (outside `torch.cuda.max_memory_allocated`, which
bench/gpu_check.py measures), the no-grad scoring passes (smaller than the training pass), vLLM. Every length is
its maximum, so for prompts shorter than `max_prompt_length` this overestimates the activations and the cache.

Imports: the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEAD_TILE_TOKENS, HEAD_TILE_VOCAB = 4096, 32768  # TRL's fused head (trl/kernels/chunked_logprob.py)
SWEEP_CHUNK_TOKENS = 1024  # arca.credit.signals' default `chunk_tokens`
SWEPT_SIDES = {"kl": 2, "entropy_reduction": 1, "divergence": 1}  # float32 vocab sweeps per step
LORA_STATE_BYTES = 16  # float32 param + gradient + AdamW's two moments
GIB = 2**30


@dataclass(frozen=True)
class Architecture:
    """What the estimate reads from a Hugging Face `config.json` (Llama / Qwen2 / Qwen3 style decoders)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Architecture:
        missing = [
            k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size") if k not in config
        ]
        if missing:
            raise ValueError(f"model config: no {', '.join(missing)} (not a Llama/Qwen-style decoder config.json)")
        heads = int(config.get("num_attention_heads", 1))
        return cls(
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
            qk_norm=config.get("model_type") == "qwen3",
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of one decoder block, by PEFT target name."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def param_count(arch: Architecture) -> int:
    """Every parameter of the model (no biases: Llama/Qwen3 have none in these layers)."""
    linear = sum(a * b for a, b in arch.linear_shapes().values())
    norms = 2 * arch.hidden + (2 * arch.head_dim if arch.qk_norm else 0)
    embed = arch.vocab * arch.hidden
    return embed * (1 if arch.tied else 2) + arch.layers * (linear + norms) + arch.hidden


def lora_param_count(arch: Architecture, rank: int, targets: tuple[str, ...] | str) -> int:
    """r x (in + out) per adapted linear layer; `all-linear` (PEFT's) is every projection of the block."""
    names = ALL_LINEAR if targets == "all-linear" else tuple(targets)
    shapes = arch.linear_shapes()
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"lora.target_modules: {unknown} are not linear layers of this model ({', '.join(shapes)})")
    return arch.layers * sum(rank * sum(shapes[n]) for n in names)


@dataclass(frozen=True)
class Shape:
    """One training process's batch: `micro_batch` rollouts per loss pass, `rollouts` generated at once."""

    micro_batch: int
    rollouts: int
    prompt_tokens: int
    completion_tokens: int
    dtype: str
    rank: int
    targets: tuple[str, ...] | str
    lora_dropout: float
    gradient_checkpointing: bool


def activation_bytes(arch: Architecture, shape: Shape) -> int:
    """Saved activations of one micro-batch's loss forward (see the module docstring for the counts)."""
    h, q, kv, i = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.intermediate
    dropout = shape.lora_dropout > 0
    per_token_layer = (16 * h + 7 * q + 5 * kv + 5 * i) if dropout else (13 * h + 6 * q + 5 * kv + 4 * i)
    tokens = shape.micro_batch * (shape.prompt_tokens + shape.completion_tokens)
    size = DTYPE_BYTES[shape.dtype]
    if shape.gradient_checkpointing:
        return tokens * size * (arch.layers * h + per_token_layer)
    return tokens * size * arch.layers * per_token_layer


def method_extra_bytes(arch: Architecture, shape: Shape, method: str) -> int:
    """What `method` adds to a training pass over `uniform` (see the module docstring)."""
    tokens = shape.micro_batch * (shape.prompt_tokens + shape.completion_tokens)
    if method in ("arca", "arca_perm"):
        return 2 * tokens * arch.hidden * 4
    if method in SWEPT_SIDES:
        chunk = min(SWEEP_CHUNK_TOKENS, shape.micro_batch * shape.completion_tokens)
        return SWEPT_SIDES[method] * 3 * chunk * arch.vocab * 4
    return 0


def peak_bytes(arch: Architecture, shape: Shape, method: str = "uniform") -> dict[str, int]:
    """The terms of the estimate and their `peak` (bytes)."""
    size = DTYPE_BYTES[shape.dtype]
    head_tokens = min(shape.micro_batch * shape.completion_tokens, HEAD_TILE_TOKENS)
    terms = {
        "weights": param_count(arch) * size,
        "lora_state": lora_param_count(arch, shape.rank, shape.targets) * LORA_STATE_BYTES,
        "generation": 2 * arch.layers * arch.kv_heads * arch.head_dim * size * shape.rollouts
        * (shape.prompt_tokens + shape.completion_tokens),
        "activations": activation_bytes(arch, shape),
        "head_chunk": 2 * head_tokens * min(arch.vocab, HEAD_TILE_VOCAB) * 4,
        "method": method_extra_bytes(arch, shape, method),
    }  # fmt: skip
    training = terms["activations"] + terms["head_chunk"] + terms["method"]
    terms["peak"] = terms["weights"] + terms["lora_state"] + max(terms["generation"], training)
    return terms
