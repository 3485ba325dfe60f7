"""`TrainSettings`: everything one GRPO run needs besides its credit method, validated on construction.

Errors name the field (`TrainSettings.max_steps must be an int > 0, got 0`), since the library is also used
without params.yaml; `stages.train` maps each field to its params key (`SettingError.field`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arca.choices import DEVICES, DTYPES, LOSS_TYPES, LR_SCHEDULERS
from arca.tasks.grading import REWARD_FUNCS


class SettingError(ValueError):
    """A `TrainSettings` field out of range: `field` is its name, `detail` what it must be and what it got."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"TrainSettings.{field} {detail}")
        self.field, self.detail = field, detail


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainSettings:
    """Everything one run needs besides its credit method (see `CreditConfig`).

    Args:
        model_dir: HF model directory (weights + tokenizer). train_path: Parquet with `DATA_COLUMNS`.
        output_dir: the run's directory (see the module docstring).
        checkpoint_dir: where TRL checkpoints (and kept snapshots) go; None = `output_dir/checkpoints`. The
            pipeline keeps them outside the run's DVC outputs (data/checkpoints/<run>), untracked: nothing
            downstream depends on ~100 MB of optimizer state, and a killed run still resumes from them.
        seed: seeds LoRA init, sampling and data order.
        rank, lora_alpha, lora_dropout, target_modules: LoRA, the same for every method (rank-matched).
        learning_rate ... gradient_accumulation_steps: GRPO (TRL names); one optimizer step takes
            `prompts_per_step` prompts x `num_generations` completions, split into
            `gradient_accumulation_steps` micro-batches per process.
        top_p, top_k: None leaves sampling unfiltered.
        grader: the training reward, a name of `arca.tasks.grading.REWARD_FUNCS` (`math_verify` or the paper's `exact`).
        lr_scheduler_type, warmup_steps, max_grad_norm, weight_decay: HF `TrainingArguments`, passed through
            (defaults: HF's; the paper: cosine, 10, 1.0, 0.0); `max_grad_norm` 0 turns clipping off.
        max_prompt_length: drop training problems whose prompt (as TRL tokenizes it) is longer; None keeps all.
        dtype: `auto` = bfloat16 on CUDA, float32 on CPU.
        device: where the run trains: `cuda` (and fail without a usable CUDA device, never fall back to the CPU),
            `cpu`, or `auto` (CUDA when torch sees a device, else the CPU); see `resolve_device`.
        use_vllm, vllm_mode, vllm_importance_sampling_correction: TRL's vLLM generation (`colocate`: vLLM shares
            the training GPU; `server`: `trl vllm-serve` elsewhere) and its importance-sampling correction of the
            sampler/trainer mismatch, passed through (untested here: no GPU). The credit hooks see TRL's loss
            forward, whichever engine sampled the completions.
        chat_template_kwargs: passed to `apply_chat_template` (e.g. `{"enable_thinking": False}`).
    """

    model_dir: Path
    train_path: Path
    output_dir: Path
    checkpoint_dir: Path | None = None
    seed: int = 0
    rank: int = 8
    lora_alpha: float = 16.0  # alpha = 2 * rank, the common LoRA setting
    lora_dropout: float = 0.0  # > 0 costs saliences one dropout-free pass per micro-batch (SPEC 2b)
    target_modules: tuple[str, ...] | str = ALL_LINEAR  # every linear layer of a Qwen3/Llama block
    learning_rate: float = 1e-5  # LoRA needs ~10x the full-finetune GRPO rate
    max_steps: int = 100
    prompts_per_step: int = 8
    num_generations: int = 8  # group size for GRPO's advantage baseline
    max_completion_length: int = 512
    beta: float = 0.0  # TRL's default: no KL penalty, no reference pass
    temperature: float = 1.0  # sample from the policy itself
    top_p: float | None = None
    top_k: int | None = None
    loss_type: str = "dapo"  # TRL's default: token-level normalization without length bias
    grader: str = "math_verify"  # equivalence, not string equality: `0.5` earns credit against `\frac{1}{2}`
    lr_scheduler_type: str = "linear"  # HF's default (decays to 0 at max_steps)
    warmup_steps: int = 0  # HF's default
    max_grad_norm: float = 1.0  # HF's default: clip the global gradient norm at 1
    weight_decay: float = 0.0  # HF's default: no decay
    max_prompt_length: int | None = None  # TRL has no limit; None keeps every problem
    save_steps: int = 50
    logging_steps: int = 1  # one log.tsv row per optimizer step
    gradient_accumulation_steps: int = 1
    dtype: str = "auto"
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_importance_sampling_correction: bool = True  # TRL's default; the paper profile turns it off
    # Off by default and in every profile (paper and study included): with it on, HF generation runs without a
    # KV cache (~20x slower rollouts on CPU); turn it on where long completions of a large model do not fit.
    gradient_checkpointing: bool = False
    device: str = "auto"
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an int >= 0", self)
        for name in (
            "rank",
            "max_steps",
            "prompts_per_step",
            "max_completion_length",
            "save_steps",
            "logging_steps",
            "gradient_accumulation_steps",
        ):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, "an int > 0", self)
        _require(
            isinstance(self.num_generations, int) and self.num_generations >= 2,
            "num_generations",
            "an int >= 2 (GRPO's baseline needs a group)",
            self,
        )
        for name in ("learning_rate", "lora_alpha", "temperature"):
            _require(_finite(getattr(self, name)) and getattr(self, name) > 0, name, "> 0", self)
        _require(_finite(self.beta) and self.beta >= 0, "beta", ">= 0", self)
        _require(_finite(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)", self)
        _require(
            self.top_p is None or (_finite(self.top_p) and 0 < self.top_p <= 1), "top_p", "null or in (0, 1]", self
        )
        _require(
            self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 0),
            "top_k",
            "null or an int >= 0",
            self,
        )
        _require(self.loss_type in LOSS_TYPES, "loss_type", f"one of {', '.join(LOSS_TYPES)}", self)
        _require(self.grader in REWARD_FUNCS, "grader", f"one of {', '.join(REWARD_FUNCS)}", self)
        _require(
            self.lr_scheduler_type in LR_SCHEDULERS, "lr_scheduler_type", f"one of {', '.join(LR_SCHEDULERS)}", self
        )
        _require(
            isinstance(self.warmup_steps, int) and not isinstance(self.warmup_steps, bool) and self.warmup_steps >= 0,
            "warmup_steps",
            "an int >= 0 (optimizer steps)",
            self,
        )
        for name in ("max_grad_norm", "weight_decay"):
            _require(_finite(getattr(self, name)) and getattr(self, name) >= 0, name, "a number >= 0", self)
        _require(
            self.max_prompt_length is None
            or (
                isinstance(self.max_prompt_length, int)
                and not isinstance(self.max_prompt_length, bool)
                and self.max_prompt_length > 0
            ),
            "max_prompt_length",
            "null or an int > 0 (tokens)",
            self,
        )
        _require(self.dtype in DTYPES, "dtype", f"one of {', '.join(DTYPES)}", self)
        _require(self.device in DEVICES, "device", f"one of {', '.join(DEVICES)}", self)
        modules = self.target_modules
        _require(
            isinstance(modules, str)
            or (len(modules) > 0 and all(isinstance(m, str) for m in modules) and "lm_head" not in modules),
            "target_modules",
            "a PEFT preset such as 'all-linear' or a non-empty list of module names without lm_head",
            self,
        )
        _require(isinstance(self.chat_template_kwargs, dict), "chat_template_kwargs", "a mapping", self)
        _require(isinstance(self.use_vllm, bool), "use_vllm", "true or false", self)
        _require(self.vllm_mode in ("colocate", "server"), "vllm_mode", "one of colocate, server", self)
        correction = self.vllm_importance_sampling_correction
        _require(isinstance(correction, bool), "vllm_importance_sampling_correction", "true or false", self)
        rollouts = self.prompts_per_step * self.num_generations
        _require(
            rollouts % self.gradient_accumulation_steps == 0,
            "gradient_accumulation_steps",
            f"a divisor of prompts_per_step x num_generations = {rollouts}",
            self,
        )

    @property
    def checkpoints(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir is not None else Path(self.output_dir) / "checkpoints"

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _require(ok: bool, name: str, what: str, settings: TrainSettings) -> None:
    if not ok:
        raise SettingError(name, f"must be {what}, got {getattr(settings, name)!r}")


def resolve_device(device: str) -> str:
    """`cuda` or `cpu` for a `TrainSettings.device`; `cuda` without a usable CUDA device raises `SettingError`
    naming the torch build, since a GPU profile that silently trained on the CPU would run for days.

    Why it checks `torch.cuda.is_available()`: the pinned torch's default wheel is built for a CUDA whose
    driver may be newer than the machine's, and then (as with the CPU build) torch sees no device at all.
    """
    import torch  # here, not at import: the stages validate params without loading torch's CUDA state

    if device not in DEVICES:
        raise SettingError("device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (the CPU build)"
        raise SettingError(
            "device",
            f"is cuda but torch {torch.__version__}, built for {build}, sees no usable CUDA device; install the "
            "torch build for this machine's NVIDIA driver (docs/profiles.md, GPU section) or set it to cpu",
        )
    return "cuda" if device == "cuda" or (device == "auto" and available) else "cpu"
