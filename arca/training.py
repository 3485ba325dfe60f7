"""One GRPO training run, from settings to files: LoRA + GRPO config, `CreditGRPOTrainer`, resume from the
last checkpoint, and the run's outputs (adapter, adapter snapshots, log, budget, summary) written atomically.

Layout of `output_dir`:
    adapter/                final adapter (PEFT format)
    adapters/step-NNNNNN/   adapter snapshots: step 0 (B = 0), every `save_steps`, and the final step
    checkpoints/            TRL checkpoints (optimizer, scheduler, RNG) for resuming, and snapshots/ (a copy of
                            adapters/, restored on resume); resumed only under the same settings and code
    log.tsv                 one row per logging step, columns `LOG_COLUMNS`
    budget.json             rollouts and generated tokens, so equal budgets can be checked
    metrics.json            final summary

The paper-protocol knobs (`grader`, `lr_scheduler_type`, `warmup_steps`, `max_grad_norm`, `weight_decay`,
`max_prompt_length`) default to what TRL/HF use when they are not set, so a run that leaves them alone trains
exactly as before. TRL 1.16's `GRPOConfig` has no prompt-length limit (it never truncates prompts), so
`max_prompt_length` drops the training problems whose prompt is longer, before training, and records how many
(`budget.json` `prompts_too_long`); the ARCA paper truncates them instead (its tokenizer call keeps the first
512 tokens), which would cut the problem statement short.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed

from arca.config import CreditGRPOConfig, credit_arguments
from arca.credit_config import CreditConfig
from arca.grading import REWARD_FUNCS, reward_function
from arca.io import write_json
from arca.models import DTYPES as MODEL_DTYPES
from arca.models import resolve_dtype
from arca.rollouts import prompt_token_ids
from arca.run_files import RunRecorder, json_safe, resume_point, save_adapter
from arca.trainer import CreditGRPOTrainer

logger = logging.getLogger(__name__)

DTYPES = ("auto", *MODEL_DTYPES)
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # TRL 1.16's
# HF schedulers that need no extra kwargs (`cosine_with_min_lr`, `warmup_stable_decay`, ... do, and are left out).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
LR_SCHEDULERS += ("inverse_sqrt",)
DATA_COLUMNS = ("prompt_id", "prompt", "answer")
SUMMARY_COLUMNS = ("reward", "frac_mixed_groups", "kl", "entropy", "completion_length")
SUMMARY_COLUMNS += ("gini", "etr", "fallback_rate", "max_weight")

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Where each setting comes from, for error messages.
_SOURCE = {
    "rank": "--rank",
    "seed": "--seed",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.target_modules",
    "dtype": "model.dtype",
    "chat_template_kwargs": "model.chat_template_kwargs",
}


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
        grader: the training reward, a name of `arca.grading.REWARD_FUNCS` (`math_verify` or the paper's `exact`).
        lr_scheduler_type, warmup_steps, max_grad_norm, weight_decay: HF `TrainingArguments`, passed through
            (defaults: HF's; the paper: cosine, 10, 1.0, 0.0); `max_grad_norm` 0 turns clipping off.
        max_prompt_length: drop training problems whose prompt (as TRL tokenizes it) is longer; None keeps all.
        dtype: `auto` = bfloat16 on CUDA, float32 on CPU.
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
    # Off by default: with it on, HF generation runs without a KV cache (~20x slower rollouts on CPU);
    # the paper profile turns it on to fit long completions of a 1.7B model in GPU memory.
    gradient_checkpointing: bool = False
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
        source = _SOURCE.get(name, f"train.{name}")
        prefix = "" if source.startswith("--") else "params.yaml: "
        raise ValueError(f"{prefix}{source} must be {what}, got {getattr(settings, name)!r}")


def load_prompts(path: Path) -> Dataset:
    """The training prompts: `DATA_COLUMNS` of the prepared Parquet, in memory (no HF datasets cache)."""
    if not Path(path).is_file():
        raise ValueError(f"train parquet: {path} does not exist (run the prepare stage first)")
    names = pq.read_schema(path).names
    missing = [c for c in DATA_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"train parquet {path}: missing column(s) {missing}; it needs {list(DATA_COLUMNS)}")
    table = pq.read_table(path, columns=list(DATA_COLUMNS))
    if table.num_rows == 0:
        raise ValueError(f"train parquet {path}: has no rows")
    return Dataset(table)


def drop_long_prompts(
    dataset: Dataset, tokenizer: Any, max_prompt_length: int | None, chat_template_kwargs: dict | None = None
) -> tuple[Dataset, int]:
    """(`dataset` without the rows whose prompt is longer than `max_prompt_length` tokens, how many went).

    Lengths are counted as TRL tokenizes the prompts (`arca.rollouts.prompt_token_ids`: the chat template for
    messages, plain text for raw prompts). None keeps every row.
    """
    if max_prompt_length is None:
        return dataset, 0
    lengths = [len(ids) for ids in prompt_token_ids(tokenizer, dataset["prompt"], chat_template_kwargs)]
    keep = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    if not keep:
        raise ValueError(
            f"params.yaml: train.max_prompt_length = {max_prompt_length} tokens drops every training prompt "
            f"(the shortest has {min(lengths)}); raise it or use null"
        )
    dropped = len(lengths) - len(keep)
    if dropped:
        logger.info("max_prompt_length=%d: dropped %d of %d training prompts", max_prompt_length, dropped, len(lengths))
    return (dataset.select(keep) if dropped else dataset), dropped


def grpo_config(settings: TrainSettings, credit: CreditConfig, world_size: int | None = None) -> CreditGRPOConfig:
    """TRL config for `settings` plus the run's credit fields (the public `CreditGRPOConfig`, one config path)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    per_step = settings.rollouts_per_step
    if per_step % (settings.gradient_accumulation_steps * world_size) != 0:
        raise ValueError(
            f"params.yaml: train.prompts_per_step x train.num_generations = {per_step} must divide "
            f"into gradient_accumulation_steps x processes = "
            f"{settings.gradient_accumulation_steps} x {world_size}"
        )
    dtype, cuda = resolve_dtype(settings.dtype), torch.cuda.is_available()
    return CreditGRPOConfig(
        output_dir=str(settings.checkpoints),
        seed=settings.seed,
        learning_rate=settings.learning_rate,
        max_steps=settings.max_steps,
        per_device_train_batch_size=per_step // (settings.gradient_accumulation_steps * world_size),
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        beta=settings.beta,
        temperature=settings.temperature,
        top_p=1.0 if settings.top_p is None else settings.top_p,
        top_k=0 if settings.top_k is None else settings.top_k,
        loss_type=settings.loss_type,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=settings.warmup_steps,
        max_grad_norm=settings.max_grad_norm,
        weight_decay=settings.weight_decay,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,  # the last one, plus the one before in case the last was cut mid-write
        logging_steps=settings.logging_steps,
        report_to="none",
        bf16=cuda and dtype == torch.bfloat16,  # mixed precision only on GPU; CPU runs stay float32
        fp16=cuda and dtype == torch.float16,
        use_vllm=settings.use_vllm,
        vllm_mode=settings.vllm_mode,
        vllm_importance_sampling_correction=settings.vllm_importance_sampling_correction,
        gradient_checkpointing=settings.gradient_checkpointing,
        chat_template_kwargs=dict(settings.chat_template_kwargs) or None,
        **credit_arguments(credit),
    )


def lora_config(settings: TrainSettings) -> LoraConfig:
    """Rank-matched LoRA: rank, alpha and target modules do not depend on the method."""
    modules = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=modules,
        task_type="CAUSAL_LM",
    )


# ---- the run ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _deterministic(on: bool) -> Iterator[None]:
    """`torch.use_deterministic_algorithms` for the run (cheap on CPU), restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def run_fingerprint(settings: TrainSettings, credit: CreditConfig, reward_funcs: Sequence[Callable]) -> dict:
    """Everything that shapes the trained adapter (not `output_dir`), as plain JSON values."""
    settings_fields = {k: v for k, v in asdict(settings).items() if k not in ("output_dir", "checkpoint_dir")}
    rewards = [f"{f.__module__}.{f.__qualname__}" for f in reward_funcs]
    # The code too: DVC reruns the stage when one of these modules changes, and resuming a checkpoint
    # written by the old code would hand back the old adapter.
    code = {name: _source_md5(name) for name in TRAINING_MODULES}
    return json.loads(
        json.dumps(
            {"settings": settings_fields, "credit": asdict(credit), "rewards": rewards, "code": code}, default=str
        )
    )


TRAINING_MODULES = (
    "arca.trainer",
    "arca.config",
    "arca.capture",
    "arca.noise_probe",
    "arca.credit_log",
    "arca.sampler",
    "arca.training",
    "arca.run_files",
    "arca.credit",
    "arca.credit_config",
    "arca.signals",
    "arca.lora_local",
    "arca.precision",
    "arca.grading",
    "arca.diagnostics",
    "arca.rollouts",  # prompt tokenization decides which prompts `max_prompt_length` keeps
)


def _source_md5(module: str) -> str:
    spec = importlib.util.find_spec(module)
    origin = Path(spec.origin) if spec and spec.origin else None
    return hashlib.md5(origin.read_bytes()).hexdigest() if origin and origin.is_file() else "unknown"


def run_training(
    settings: TrainSettings,
    credit: CreditConfig,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    *,
    reward_funcs: Sequence[Callable[..., list[float]]] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, Any]:
    """Train (or resume, or finish) one run and write its outputs; see the module docstring.

    Args:
        settings, credit: the run. model, tokenizer: loaded from `settings.model_dir` when None (the model
            must be the base model, not a `PeftModel`).
        reward_funcs: TRL reward functions; None: the one `settings.grader` names.
        callbacks: extra `TrainerCallback`s (e.g. to stop a test run mid-way).

    Returns:
        The summary written to metrics.json.
    """
    reward_funcs = (reward_function(settings.grader),) if reward_funcs is None else tuple(reward_funcs)
    dataset = load_prompts(settings.train_path)
    out = Path(settings.output_dir)
    fingerprint = run_fingerprint(settings, credit, reward_funcs)
    last, prior, prior_rows = resume_point(out, fingerprint, settings.checkpoints)
    set_seed(settings.seed)
    with _deterministic(not torch.cuda.is_available()):
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(settings.model_dir, dtype=resolve_dtype(settings.dtype))
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
        dataset, too_long = drop_long_prompts(
            dataset, tokenizer, settings.max_prompt_length, settings.chat_template_kwargs
        )
        recorder = RunRecorder(
            out, settings.save_steps, settings.max_steps, fingerprint, prior, prior_rows, settings.checkpoints
        )
        trainer = CreditGRPOTrainer(
            model=model,
            reward_funcs=list(reward_funcs),
            args=grpo_config(settings, credit),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(settings),
            callbacks=[recorder, *callbacks],
        )
        recorder.trainer = trainer
        trainer.generated_tokens = int(prior.get("generated_tokens", 0))
        step0 = out / "adapters" / "step-000000"
        if trainer.is_world_process_zero() and not step0.exists():
            recorder.snapshot(trainer.model, 0)  # TRL's initial adapter (B = 0): checkpoints load inside train()
        if last:
            logger.info("resuming %s from %s", out, last)
        trainer.train(resume_from_checkpoint=last)
    return _finish(trainer, recorder, settings, credit, too_long) if trainer.is_world_process_zero() else {}


def _finish(
    trainer: CreditGRPOTrainer, recorder: RunRecorder, settings: TrainSettings, credit: CreditConfig, too_long: int
) -> dict:
    """Write adapter/, budget.json and metrics.json; return the metrics."""
    out, steps = Path(settings.output_dir), trainer.state.global_step
    save_adapter(trainer.model, out / "adapter")
    budget = {
        "method": credit.method,
        "rank": settings.rank,
        "seed": settings.seed,
        "prompts": settings.prompts_per_step,
        "generations": settings.num_generations,
        "steps": steps,
        "rollouts": settings.rollouts_per_step * steps,
        "generated_tokens": trainer.generated_tokens,
    }
    if settings.max_prompt_length is not None:  # absent otherwise: the default's budget.json stays as it was
        budget["prompts_too_long"] = too_long
    write_json(out / "budget.json", json_safe(budget))
    # Wall time only here: budget.json is a dump dep, and a retrain with identical outputs must not rerun dumps.
    wall = {"wall_seconds": round(recorder.wall_seconds(), 3)}
    metrics = json_safe({**summarize(recorder.rows, credit, settings, steps), **wall})
    write_json(out / "metrics.json", metrics)
    return metrics


def summarize(
    rows: Sequence[dict[str, float]], credit: CreditConfig, settings: TrainSettings, steps: int
) -> dict[str, Any]:
    """metrics.json: means over the whole run and over its last 10% of steps (at least one logging row)."""
    tail_from = steps - max(1, math.ceil(0.1 * steps))
    tail = [r for r in rows if r["step"] > tail_from] or list(rows[-1:])

    def mean(selected: Sequence[dict[str, float]], column: str) -> float:
        values = [r[column] for r in selected if math.isfinite(r[column])]
        return sum(values) / len(values) if values else float("nan")

    summary: dict[str, Any] = {
        "method": credit.method,
        "rank": settings.rank,
        "seed": settings.seed,
        "steps": steps,
        "tail_steps": steps - tail_from,
    }
    summary["reward_mean"] = mean(rows, "reward")
    for column in SUMMARY_COLUMNS:
        summary[f"{column}_tail"] = mean(tail, column)
    return summary
