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
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOConfig

from arca.credit_config import CreditConfig
from arca.grading import accuracy_reward
from arca.io import atomic_path, read_json, write_json, write_text
from arca.models import DTYPES as MODEL_DTYPES
from arca.models import resolve_dtype
from arca.trainer import CreditGRPOTrainer

logger = logging.getLogger(__name__)

DTYPES = ("auto", *MODEL_DTYPES)
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # TRL 1.16's
DATA_COLUMNS = ("prompt_id", "prompt", "answer")
# log.tsv column -> TRL log key (frac_mixed_groups is derived from frac_reward_zero_std).
LOG_COLUMNS: dict[str, str] = {
    "step": "step",
    "reward": "reward",
    "reward_std": "reward_std",
    "frac_mixed_groups": "frac_reward_zero_std",
    "loss": "loss",
    "kl": "kl",
    "entropy": "entropy",
    "completion_length": "completions/mean_length",
    "gini": "credit/gini",
    "etr": "credit/etr",
    "frac_uniform": "credit/frac_uniform",
    "frac_middle": "credit/frac_middle",
    "frac_concentrated": "credit/frac_concentrated",
    "fallback_rate": "credit/fallback_rate",
    "max_weight": "credit/max_weight",
}
# log.tsv columns summarized in metrics.json over the last steps of the run.
SUMMARY_COLUMNS = ("reward", "frac_mixed_groups", "kl", "entropy", "completion_length")
SUMMARY_COLUMNS += ("gini", "etr", "fallback_rate", "max_weight")
RUN_STATE = "run_state.json"  # inside each TRL checkpoint: settings fingerprint, generated tokens, wall time

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
        seed: seeds LoRA init, sampling and data order.
        rank, lora_alpha, lora_dropout, target_modules: LoRA, the same for every method (rank-matched).
        learning_rate ... gradient_accumulation_steps: GRPO (TRL names); one optimizer step takes
            `prompts_per_step` prompts x `num_generations` completions, split into
            `gradient_accumulation_steps` micro-batches per process.
        top_p, top_k: None leaves sampling unfiltered.
        dtype: `auto` = bfloat16 on CUDA, float32 on CPU.
        use_vllm: TRL's vLLM generation, passed through (untested here).
        chat_template_kwargs: passed to `apply_chat_template` (e.g. `{"enable_thinking": False}`).
    """

    model_dir: Path
    train_path: Path
    output_dir: Path
    seed: int = 0
    rank: int = 8
    lora_alpha: float = 16.0  # alpha = 2 * rank, the common LoRA setting
    lora_dropout: float = 0.0  # no noise in ARCA's adapter-on states (taken from the training forward)
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
    save_steps: int = 50
    logging_steps: int = 1  # one log.tsv row per optimizer step
    gradient_accumulation_steps: int = 1
    dtype: str = "auto"
    use_vllm: bool = False
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
        rollouts = self.prompts_per_step * self.num_generations
        _require(
            rollouts % self.gradient_accumulation_steps == 0,
            "gradient_accumulation_steps",
            f"a divisor of prompts_per_step x num_generations = {rollouts}",
            self,
        )

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


def grpo_config(settings: TrainSettings, credit: CreditConfig, world_size: int | None = None) -> GRPOConfig:
    """TRL config for `settings`: the same for every method except `top_entropy_quantile`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    per_step = settings.rollouts_per_step
    if per_step % (settings.gradient_accumulation_steps * world_size) != 0:
        raise ValueError(
            f"params.yaml: train.prompts_per_step x train.num_generations = {per_step} must divide "
            f"into gradient_accumulation_steps x processes = "
            f"{settings.gradient_accumulation_steps} x {world_size}"
        )
    dtype, cuda = resolve_dtype(settings.dtype), torch.cuda.is_available()
    return GRPOConfig(
        output_dir=str(Path(settings.output_dir) / "checkpoints"),
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
        top_entropy_quantile=credit.top_entropy_quantile if credit.method == "top_entropy" else 1.0,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,  # the last one, plus the one before in case the last was cut mid-write
        logging_steps=settings.logging_steps,
        report_to="none",
        bf16=cuda and dtype == torch.bfloat16,  # mixed precision only on GPU; CPU runs stay float32
        fp16=cuda and dtype == torch.float16,
        use_vllm=settings.use_vllm,
        gradient_checkpointing=settings.gradient_checkpointing,
        chat_template_kwargs=dict(settings.chat_template_kwargs) or None,
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


# ---- atomic outputs ---------------------------------------------------------------------------------------


def _json_safe(data: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf (e.g. `kl` when beta = 0) become null: strict JSON readers reject NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in data.items()}


def save_adapter(model: Any, dest: Path) -> None:
    """`model.save_pretrained` (adapter only for a PEFT model) into `dest`, replacing it atomically."""
    with atomic_path(dest) as tmp:
        model.save_pretrained(str(tmp))
        _sort_target_modules(tmp / "adapter_config.json")


def _sort_target_modules(config_path: Path) -> None:
    """PEFT stores `target_modules` from a Python set, whose order changes with string hash randomization;
    sort it so the same adapter gives the same bytes (and the same DVC hash) in every process."""
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---- the run recorder -------------------------------------------------------------------------------------


class RunRecorder(TrainerCallback):
    """Writes log.tsv and the adapter snapshots during training, and into each TRL checkpoint the run state
    (`RUN_STATE`: settings fingerprint, generated tokens, wall time) and a copy of the log, so a resumed run
    needs nothing but its checkpoint.

    Args:
        output_dir: the run directory. save_steps, max_steps: snapshot schedule.
        fingerprint: `run_fingerprint` of the run. prior: `RUN_STATE` of the checkpoint being resumed, if
            any. prior_rows: that checkpoint's log rows.
    """

    def __init__(
        self,
        output_dir: Path,
        save_steps: int,
        max_steps: int,
        fingerprint: dict[str, Any],
        prior: dict[str, Any] | None = None,
        prior_rows: Sequence[dict[str, float]] = (),
    ):
        self.output_dir = Path(output_dir)
        self.save_steps, self.max_steps, self.fingerprint = save_steps, max_steps, fingerprint
        self.prior_wall = float((prior or {}).get("wall_seconds", 0.0))
        self.trainer: CreditGRPOTrainer | None = None
        self.rows: list[dict[str, float]] = list(prior_rows)
        self._start = time.monotonic()

    def wall_seconds(self) -> float:
        return self.prior_wall + time.monotonic() - self._start

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._start = time.monotonic()
        self.rows = [r for r in self.rows if r["step"] <= state.global_step]  # steps after it are redone
        if not state.is_world_process_zero:
            return
        # DVC wipes non-persisted outputs before rerunning a stage: bring back the snapshots kept beside the
        # (persisted) checkpoints, so a resumed run ends with every snapshot an uninterrupted run has.
        kept = self.output_dir / "checkpoints" / "snapshots"
        for saved in sorted(kept.glob("step-*")) if kept.is_dir() else ():
            target = self.output_dir / "adapters" / saved.name
            if int(saved.name.split("-")[1]) <= state.global_step and not target.exists():
                with atomic_path(target) as tmp:
                    shutil.copytree(saved, tmp)
        snapshot = self.output_dir / "adapters" / f"step-{state.global_step:06d}"
        if state.global_step > 0 and not snapshot.exists():
            self.snapshot(model, state.global_step)  # the resumed checkpoint's adapter

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs:  # the end-of-training summary carries no TRL metrics
            return
        row = {col: _as_float(logs.get(key)) for col, key in LOG_COLUMNS.items()}
        row["step"] = state.global_step
        row["frac_mixed_groups"] = 1.0 - row["frac_mixed_groups"]
        self.rows.append(row)
        if state.is_world_process_zero:
            write_log(self.output_dir / "log.tsv", self.rows)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step == self.max_steps:
            control.should_save = True  # the final step always leaves a checkpoint, so a rerun is a no-op
        if (step % self.save_steps == 0 or step == self.max_steps) and state.is_world_process_zero:
            self.snapshot(model, step)
        return control

    def snapshot(self, model: Any, step: int) -> None:
        """Adapter at `step` into adapters/ (the DVC output) and a copy under checkpoints/ (persisted)."""
        for root in (self.output_dir / "adapters", self.output_dir / "checkpoints" / "snapshots"):
            save_adapter(model, root / f"step-{step:06d}")

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.trainer is not None:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            run_state = {
                "fingerprint": self.fingerprint,
                "generated_tokens": self.trainer.generated_tokens,
                "wall_seconds": self.wall_seconds(),
            }
            write_json(checkpoint / RUN_STATE, run_state)
            write_log(checkpoint / "log.tsv", self.rows)


def _as_float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def write_log(path: Path, rows: Sequence[dict[str, float]]) -> None:
    """log.tsv: a header of `LOG_COLUMNS`, then one row per logging step (`nan` where TRL logged nothing)."""
    lines = ["\t".join(LOG_COLUMNS)]
    for row in rows:
        lines.append("\t".join(str(int(row[c])) if c == "step" else repr(float(row[c])) for c in LOG_COLUMNS))
    write_text(path, "\n".join(lines) + "\n")


def read_log(path: Path) -> list[dict[str, float]]:
    """Rows of a log.tsv written by `write_log` (empty if there is none)."""
    if not Path(path).is_file():
        return []
    header, *lines = Path(path).read_text().splitlines()
    columns = header.split("\t")
    return [{c: (int(v) if c == "step" else float(v)) for c, v in zip(columns, line.split("\t"))} for line in lines]


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
    settings_fields = {k: v for k, v in asdict(settings).items() if k != "output_dir"}
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
    "arca.training",
    "arca.credit",
    "arca.credit_config",
    "arca.signals",
    "arca.grading",
    "arca.diagnostics",
)


def _source_md5(module: str) -> str:
    spec = importlib.util.find_spec(module)
    origin = Path(spec.origin) if spec and spec.origin else None
    return hashlib.md5(origin.read_bytes()).hexdigest() if origin and origin.is_file() else "unknown"


def resume_point(out: Path, fingerprint: dict) -> tuple[str | None, dict[str, Any], list[dict[str, float]]]:
    """(last checkpoint, its run state, its log rows) if the run in `out` can be resumed, else a fresh start.

    A checkpoint written under other settings is never resumed: the run's partial outputs are deleted and
    training starts over (with DVC, changed params mean a new run).
    """
    last = get_last_checkpoint(str(out / "checkpoints")) if (out / "checkpoints").is_dir() else None
    state = read_json(Path(last) / RUN_STATE) if last and (Path(last) / RUN_STATE).is_file() else {}
    if last and state.get("fingerprint") == fingerprint:
        return last, state, read_log(Path(last) / "log.tsv")
    if last:
        logger.warning("%s: settings changed since %s; starting the run over", out, last)
    if int(os.environ.get("RANK", "0")) == 0:
        for name in ("checkpoints", "adapters", "adapter", "log.tsv", "budget.json", "metrics.json"):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return None, {}, []


def run_training(
    settings: TrainSettings,
    credit: CreditConfig,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    *,
    reward_funcs: Sequence[Callable[..., list[float]]] = (accuracy_reward,),
    callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, Any]:
    """Train (or resume, or finish) one run and write its outputs; see the module docstring.

    Args:
        settings, credit: the run. model, tokenizer: loaded from `settings.model_dir` when None (the model
            must be the base model, not a `PeftModel`).
        reward_funcs: TRL reward functions.
        callbacks: extra `TrainerCallback`s (e.g. to stop a test run mid-way).

    Returns:
        The summary written to metrics.json.
    """
    dataset = load_prompts(settings.train_path)
    out = Path(settings.output_dir)
    fingerprint = run_fingerprint(settings, credit, reward_funcs)
    last, prior, prior_rows = resume_point(out, fingerprint)
    set_seed(settings.seed)
    with _deterministic(not torch.cuda.is_available()):
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(settings.model_dir, dtype=resolve_dtype(settings.dtype))
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
        recorder = RunRecorder(out, settings.save_steps, settings.max_steps, fingerprint, prior, prior_rows)
        trainer = CreditGRPOTrainer(
            model=model,
            reward_funcs=list(reward_funcs),
            args=grpo_config(settings, credit),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(settings),
            callbacks=[recorder, *callbacks],
            credit=credit,
        )
        recorder.trainer = trainer
        trainer.generated_tokens = int(prior.get("generated_tokens", 0))
        step0 = out / "adapters" / "step-000000"
        if trainer.is_world_process_zero() and not step0.exists():
            recorder.snapshot(trainer.model, 0)  # TRL's initial adapter (B = 0): checkpoints load inside train()
        if last:
            logger.info("resuming %s from %s", out, last)
        trainer.train(resume_from_checkpoint=last)
    return _finish(trainer, recorder, settings, credit) if trainer.is_world_process_zero() else {}


def _finish(trainer: CreditGRPOTrainer, recorder: RunRecorder, settings: TrainSettings, credit: CreditConfig) -> dict:
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
        "wall_seconds": round(recorder.wall_seconds(), 3),
    }
    write_json(out / "budget.json", _json_safe(budget))
    metrics = _json_safe(summarize(recorder.rows, credit, settings, steps))
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
