"""One GRPO training run, from settings to files: LoRA + GRPO config, `CreditGRPOTrainer`, resume from the
last checkpoint, and the run's outputs (adapter, adapter snapshots, log, budget, summary) written atomically.

Layout of `output_dir`:
    adapter/                final adapter (PEFT format)
    adapters/step-NNNNNN/   adapter snapshots: step 0 (B = 0), every `save_steps`, and the final step
    checkpoints/            TRL checkpoints (optimizer, scheduler, RNG) for resuming, and snapshots/ (a copy of
                            adapters/, restored on resume); resumed only under the same settings and code
    log.tsv                 one row per logging step, columns `LOG_COLUMNS`
    budget.json             rollouts and generated tokens, so equal budgets can be checked, and `params_md5`
                            (`settings_md5`: the settings the run was trained under)
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
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed

from arca.credit.config import CreditConfig, run_method
from arca.grpo.config import CreditGRPOConfig, credit_arguments, report_to_from_env
from arca.grpo.trainer import CreditGRPOTrainer
from arca.io import write_json
from arca.models.base import resolve_dtype
from arca.run.files import RunRecorder, json_safe, restore_finished, resume_point, save_adapter
from arca.run.fingerprint import run_fingerprint, settings_md5
from arca.run.settings import (
    ALL_LINEAR,
    DTYPES,
    LOSS_TYPES,
    LR_SCHEDULERS,
    SettingError,
    TrainSettings,
    resolve_device,
)
from arca.sampling.rollouts import prompt_token_ids
from arca.tasks.grading import reward_function

logger = logging.getLogger(__name__)
# Re-exported: `TrainSettings` and its choice lists live in arca.run.settings (no TRL import).
__all__ = ["ALL_LINEAR", "DTYPES", "LOSS_TYPES", "LR_SCHEDULERS", "SettingError", "TrainSettings", "run_training"]
__all__ += ["run_fingerprint", "settings_md5"]

DATA_COLUMNS = ("prompt_id", "prompt", "answer")
SUMMARY_COLUMNS = ("reward", "frac_mixed_groups", "kl", "entropy", "completion_length")
SUMMARY_COLUMNS += ("gini", "etr", "fallback_rate", "max_weight")
WHOLE_RUN_COLUMNS = ("gini", "etr", "fallback_rate")  # `<column>_mean` over every logged step


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

    Lengths are counted as TRL tokenizes the prompts (`arca.sampling.rollouts.prompt_token_ids`: the chat template for
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
    """TRL config for `settings` plus the run's credit fields (the public `CreditGRPOConfig`, one config path).
    CUDA (bf16 / fp16 mixed precision) or the CPU as `settings.device` resolves (`resolve_device`: `cuda` without
    a device raises); `world_size` > 1 (default: `WORLD_SIZE`) turns DDP's unused-parameter search off."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    per_step = settings.rollouts_per_step
    if per_step % (settings.gradient_accumulation_steps * world_size) != 0:
        raise ValueError(
            f"params.yaml: train.prompts_per_step x train.num_generations = {per_step} must divide "
            f"into gradient_accumulation_steps x processes = "
            f"{settings.gradient_accumulation_steps} x {world_size}"
        )
    # `train.device: cuda` without a device raises here (and in the stages, before any model loads): never a
    # silent CPU run of a GPU profile.
    cuda = resolve_device(settings.device) == "cuda"
    dtype = resolve_dtype(settings.dtype, cuda)
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
        report_to=report_to_from_env(),  # trackers watch only: in no fingerprint, hash or DVC dependency
        # Without it, Accelerate never takes the multi-CPU (gloo) path: each process of `accelerate launch` on a
        # machine without CUDA trained alone, as process 0, on its share of the batch.
        use_cpu=not cuda,
        bf16=cuda and dtype == torch.bfloat16,  # mixed precision only on GPU; CPU runs stay float32
        fp16=cuda and dtype == torch.float16,
        use_vllm=settings.use_vllm,
        vllm_mode=settings.vllm_mode,
        vllm_importance_sampling_correction=settings.vllm_importance_sampling_correction,
        gradient_checkpointing=settings.gradient_checkpointing,
        # A `PeftModel` is no `PreTrainedModel`, so transformers would set DDP's find_unused_parameters=True
        # (an extra graph walk every backward) although every LoRA parameter gets a gradient.
        ddp_find_unused_parameters=False if world_size > 1 else None,
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


def _process_group(cuda: bool) -> None:
    """Start Accelerate's process state (the one TRL's Trainer takes over) when several processes train, so that
    `resume_point`'s barrier around the stale-checkpoint cleanup really waits (a no-op for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState(cpu=not cuda)


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


def run_training(
    settings: TrainSettings,
    credit: CreditConfig,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    *,
    reward_funcs: Sequence[Callable[..., list[float]]] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    tracker_dir: Path | None = None,
) -> dict[str, Any]:
    """Train (or resume, or finish) one run and write its outputs; see the module docstring.

    Args:
        settings, credit: the run. model, tokenizer: loaded from `settings.model_dir` when None (the model
            must be the base model, not a `PeftModel`).
        reward_funcs: TRL reward functions; None: the one `settings.grader` names.
        callbacks: extra `TrainerCallback`s (e.g. to stop a test run mid-way).
        tracker_dir: where file-based trackers of `$ARCA_REPORT_TO` write (`place_tracker_files`); None: TRL's
            default, under the checkpoint directory.

    Returns:
        The summary written to metrics.json.
    """
    reward_funcs = (reward_function(settings.grader),) if reward_funcs is None else tuple(reward_funcs)
    report_to_from_env()  # a bad $ARCA_REPORT_TO stops here, before any model loads
    dataset = load_prompts(settings.train_path)
    out = Path(settings.output_dir)
    fingerprint = run_fingerprint(settings, credit, reward_funcs)
    cuda = resolve_device(settings.device) == "cuda"
    _process_group(cuda)  # before resume_point: its barrier must see every process
    last, prior, prior_rows = resume_point(out, fingerprint, settings.checkpoints)
    set_seed(settings.seed)
    with _deterministic(not cuda):
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(settings.model_dir, dtype=resolve_dtype(settings.dtype, cuda))
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
        place_tracker_files(trainer, tracker_dir)
        trainer.generated_tokens = int(prior.get("generated_tokens", 0))
        step0 = out / "adapters" / "step-000000"
        if trainer.is_world_process_zero() and not step0.exists():
            recorder.snapshot(trainer.model, 0)  # TRL's initial adapter (B = 0): checkpoints load inside train()
        if last and restore_finished(trainer, recorder, last):
            logger.info("%s: finished at %s; restored, nothing to train", out, last)
        else:
            if last:
                logger.info("resuming %s from %s", out, last)
            trainer.train(resume_from_checkpoint=last)
    if not trainer.is_world_process_zero():
        return {}
    return _finish(trainer, recorder, settings, credit, too_long, settings_md5(fingerprint))


def place_tracker_files(trainer: CreditGRPOTrainer, tracker_dir: Path | None) -> None:
    """Point TensorBoard's event files at `tracker_dir/tensorboard` (unless `TENSORBOARD_LOGGING_DIR` is set),
    so they land outside the DVC outputs and the checkpoints; trackers with a server or their own directory
    (wandb, trackio, mlflow) keep theirs. No-op when `tracker_dir` is None or no TensorBoard tracker is on."""
    from transformers.integrations import TensorBoardCallback

    if tracker_dir is None:
        return
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(Path(tracker_dir) / "tensorboard")


def _finish(
    trainer: CreditGRPOTrainer,
    recorder: RunRecorder,
    settings: TrainSettings,
    credit: CreditConfig,
    too_long: int,
    params_md5: str,
) -> dict:
    """Write adapter/, budget.json and metrics.json; return the metrics."""
    out, steps = Path(settings.output_dir), trainer.state.global_step
    save_adapter(trainer.model, out / "adapter")
    budget = {
        "method": run_method(credit.method, credit.permute),  # `arca_perm` for the permutation control
        "rank": settings.rank,
        "seed": settings.seed,
        "prompts": settings.prompts_per_step,
        "generations": settings.num_generations,
        "steps": steps,
        "rollouts": settings.rollouts_per_step * steps,
        "generated_tokens": trainer.generated_tokens,
        "params_md5": params_md5,
    }
    if settings.max_prompt_length is not None:  # absent otherwise: the default's budget.json stays as it was
        budget["prompts_too_long"] = too_long
    if credit.permute:  # likewise only where set
        budget["permute"] = True
    write_json(out / "budget.json", json_safe(budget))
    # Wall time only here: budget.json is a dump dep, and a retrain with identical outputs must not rerun dumps.
    wall = {"wall_seconds": round(recorder.wall_seconds(), 3)}
    metrics = json_safe({**summarize(recorder.rows, credit, settings, steps), **wall})
    write_json(out / "metrics.json", metrics)
    return metrics


def summarize(
    rows: Sequence[dict[str, float]], credit: CreditConfig, settings: TrainSettings, steps: int
) -> dict[str, Any]:
    """metrics.json: means over every logged step (`reward_mean`, `<column>_mean` of `WHOLE_RUN_COLUMNS`) and over
    the last 10% of steps (`<column>_tail`, at least one logging row)."""
    tail_from = steps - max(1, math.ceil(0.1 * steps))
    tail = [r for r in rows if r["step"] > tail_from] or list(rows[-1:])

    def mean(selected: Sequence[dict[str, float]], column: str) -> float:
        values = [r[column] for r in selected if math.isfinite(r[column])]
        return sum(values) / len(values) if values else float("nan")

    summary: dict[str, Any] = {
        "method": run_method(credit.method, credit.permute),
        **({"permute": True} if credit.permute else {}),
        "rank": settings.rank,
        "seed": settings.seed,
        "steps": steps,
        "tail_steps": steps - tail_from,
    }
    summary["reward_mean"] = mean(rows, "reward")
    # Whole-run means beside the tail ones: the ARCA paper's Gini and EffN/T columns average every logged step
    # (EffN/T = 1 / (T sum w^2) with w summing to 1, which is our ETR), so `tables` can set ours beside them.
    for column in WHOLE_RUN_COLUMNS:
        summary[f"{column}_mean"] = mean(rows, column)
    for column in SUMMARY_COLUMNS:
        summary[f"{column}_tail"] = mean(tail, column)
    return summary
