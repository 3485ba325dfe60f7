"""The files a training run leaves behind while it trains: adapter snapshots (byte-stable), log.tsv and the run
state stored in each TRL checkpoint, written by `RunRecorder`, a TRL callback, so a resumed run needs nothing
but its checkpoint folder (`checkpoint_dir`)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft import set_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint

from arca.grpo.trainer import NOISE_SIGNALS
from arca.io import atomic_path, read_json, write_json, write_text

if TYPE_CHECKING:
    from arca.grpo.trainer import CreditGRPOTrainer

logger = logging.getLogger(__name__)

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
    # The trainer's running noise estimate (SPEC 2b): noise share and rank correlation with float32 of each
    # precision-sensitive signal on a fixed probe; nan in float32 runs, which log none.
    **{f"noise_{s}": f"credit/noise_{s}" for s in NOISE_SIGNALS},
    **{f"noise_rank_{s}": f"credit/noise_rank_{s}" for s in NOISE_SIGNALS},
}
RUN_STATE = "run_state.json"  # inside each TRL checkpoint: settings fingerprint, generated tokens, wall time

# ---- atomic outputs ---------------------------------------------------------------------------------------


def json_safe(data: dict[str, Any]) -> dict[str, Any]:
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
        checkpoint_dir: Path | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else self.output_dir / "checkpoints"
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
        kept = self.checkpoint_dir / "snapshots"
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
        for root in (self.output_dir / "adapters", self.checkpoint_dir / "snapshots"):
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


def restore_finished(trainer: CreditGRPOTrainer, recorder: RunRecorder, checkpoint: str) -> bool:
    """Bring back a run whose last checkpoint is its final step, without `trainer.train`; False if it is not final.

    HF's Trainer checks `max_steps` only after a step, so resuming from the final checkpoint of a run that ends
    mid-epoch trains one step too many. Restoring loads the checkpoint's adapter and state and lets the recorder
    put the snapshots back, exactly as a resumed run that had nothing left to do.
    """
    state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
    if state.global_step < recorder.max_steps:
        return False
    set_peft_model_state_dict(trainer.model, load_file(Path(checkpoint) / SAFETENSORS_WEIGHTS_NAME))
    state.is_world_process_zero = trainer.is_world_process_zero()
    trainer.state = state
    recorder.on_train_begin(trainer.args, state, trainer.control, model=trainer.model)
    if state.is_world_process_zero:  # no step will log: the checkpoint's log is the run's
        write_log(recorder.output_dir / "log.tsv", recorder.rows)
    return True


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


def distributed_barrier() -> None:
    """Wait for every process of the run where a process group exists (`torch.distributed` initialized, as
    Accelerate's `wait_for_everyone` does); a no-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def resume_point(
    out: Path, fingerprint: dict, checkpoints: Path | None = None, barrier: Callable[[], None] = distributed_barrier
) -> tuple[str | None, dict[str, Any], list[dict[str, float]]]:
    """(last checkpoint, its run state, its log rows) if the run in `out` can be resumed, else a fresh start.

    A checkpoint written under other settings is never resumed: the run's partial outputs are deleted (by process
    0) and training starts over (with DVC, changed params mean a new run). `barrier` runs on every process before
    the deletion (no process is still reading the stale checkpoint) and after it (none writes the new run's files
    into a folder being deleted).
    """
    checkpoints = out / "checkpoints" if checkpoints is None else Path(checkpoints)
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    state = read_json(Path(last) / RUN_STATE) if last and (Path(last) / RUN_STATE).is_file() else {}
    if last and state.get("fingerprint") == fingerprint:
        return last, state, read_log(Path(last) / "log.tsv")
    if last:
        logger.warning("%s: settings changed since %s; starting the run over", out, last)
    barrier()
    if int(os.environ.get("RANK", "0")) == 0:
        outputs = ("adapters", "adapter", "log.tsv", "budget.json", "metrics.json")
        for path in (checkpoints, *(out / name for name in outputs)):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    barrier()
    return None, {}, []
