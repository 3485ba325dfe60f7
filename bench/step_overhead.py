"""Per-step time of every credit method against `uniform`, measured side by side in one process.

    python -m bench.step_overhead [--quick] [--methods uniform,arca,...] [--rounds N] [--lora-dropout P] [--clock C]

A small Qwen3-shaped model built from config (hidden 256, 4 layers; vocab 8k with --quick, 32k without) and a
synthetic word-level tokenizer; one `CreditGRPOTrainer` per method with identical settings and seeds, stepped
round-robin (the order rotates every round) so machine noise hits every method alike. Completions are pinned
to `max_completion_length` tokens, so every step does the same work. A step is TRL's `training_step`
(generation, scoring passes, loss forward and backward) plus the AdamW update. Reported for beta = 0.04 (the
reference pass exists, ARCA should be free) and beta = 0 (ARCA adds one adapter-off pass): medians over the
measured rounds, whole step and the part outside generation, in this process's CPU time (`--clock cpu`, the
default: with one torch thread that is the step's own work, which other jobs do not stretch; `--clock wall`
for elapsed time). A ratio to `uniform` is the interquartile mean over rounds
of the paired per-round ratios (both steps of a round ran seconds apart, under the same load), with a 95%
percentile-bootstrap interval over rounds (`BOOTSTRAP` seeded resamples). `--methods` benches a subset
(`uniform`, the baseline, is always in); `--lora-dropout 0.05` (the paper profile's) adds the dropout-free
salience pass of every non-fixed method (SPEC 2b). The last lines are the summary, for `arca` and `arca_local`
when benched:

    arca/uniform step time: beta>0 <ratio> [<lo>, <hi>], beta=0 <ratio> [<lo>, <hi>]
    arca_local/uniform step time: beta>0 <ratio> [<lo>, <hi>], beta=0 <ratio> [<lo>, <hi>]

Left out: gradient checkpointing (TRL turns it on inside `train()`, which this loop does not call; it would
add the same recompute to every method, so the ratios here are the conservative ones) and GPU timings.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from arca.credit.config import METHODS, CreditConfig
from arca.grpo.trainer import CreditGRPOTrainer
from arca.models.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, tiny_model
from arca.run.training import TrainSettings, grpo_config, lora_config


@dataclass(frozen=True)
class BenchSize:
    vocab: int
    completion_tokens: int
    prompt_words: int
    warmup_rounds: int
    rounds: int


QUICK = BenchSize(vocab=8192, completion_tokens=16, prompt_words=24, warmup_rounds=1, rounds=16)
FULL = BenchSize(vocab=32768, completion_tokens=64, prompt_words=96, warmup_rounds=2, rounds=20)
BETAS = (0.04, 0.0)
BOOTSTRAP = 2000  # resamples of the rounds behind every interval
# The default clock is the process's CPU time: with one torch thread it is the step's own work, which other jobs
# on a shared machine do not stretch (elapsed time does, by up to 2x here); `--clock wall` for elapsed time.
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def interquartile_mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """The mean of the middle half (25% trimmed from each end): robust to a round another job slowed down, and
    nearly as efficient as the mean when none did (on normal noise the median needs ~1.6x the rounds of the mean
    for the same interval, the interquartile mean ~1.2x)."""
    ordered = np.sort(values, axis=axis)
    n = ordered.shape[axis]
    cut = n // 4
    return np.take(ordered, range(cut, n - cut), axis=axis).mean(axis=axis)


def paired_ratio(ours: list[float], base: list[float], seed: int = 0) -> tuple[float, float, float]:
    """(estimate, lo, hi): the interquartile mean over rounds of `ours[r] / base[r]` and its 95% percentile-bootstrap
    interval (rounds resampled with replacement, seeded)."""
    ratios = np.asarray(ours) / np.asarray(base)  # (rounds,)
    picks = np.random.default_rng(seed).integers(0, len(ratios), (BOOTSTRAP, len(ratios)))
    lo, hi = np.percentile(interquartile_mean(ratios[picks], axis=1), [2.5, 97.5])
    return float(interquartile_mean(ratios)), float(lo), float(hi)


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer with `vocab` entries (chat markers + `w0 .. wN`), no files needed."""
    words = [f"w{i}" for i in range(vocab - len(SPECIAL_TOKENS))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL_TOKENS + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def small_qwen3(vocab: int, seed: int = 0) -> torch.nn.Module:
    """Qwen3-shaped: 4 layers, hidden 256, 4 heads of 64."""
    return tiny_model(vocab, seed, num_hidden_layers=4, hidden_size=256, intermediate_size=768, head_dim=64)


def id_reward(completion_ids, **kwargs) -> list[float]:
    """A reward that varies within every group, so advantages (and gradients) are not zero."""
    return [(sum(ids) % 97) / 97 for ids in completion_ids]


class Stepper:
    """One trainer driven one optimizer step at a time (TRL's `training_step` + AdamW), timed."""

    def __init__(
        self,
        method: str,
        beta: float,
        size: BenchSize,
        dataset: Dataset,
        workdir: Path,
        lora_dropout: float = 0.0,
        clock: Callable[[], float] = time.process_time,
    ):
        self.clock = clock
        settings = TrainSettings(
            model_dir=workdir,
            train_path=workdir / "unused.parquet",
            output_dir=workdir / f"{method}-{beta}",
            rank=8,
            lora_dropout=lora_dropout,
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            learning_rate=1e-3,
            max_steps=1000,
            prompts_per_step=2,
            num_generations=4,
            max_completion_length=size.completion_tokens,
            beta=beta,
        )
        credit = CreditConfig(method=method)
        args = grpo_config(settings, credit)
        args.generation_kwargs = {"min_new_tokens": size.completion_tokens}  # equal work in every step
        self.trainer = CreditGRPOTrainer(
            model=small_qwen3(size.vocab),
            reward_funcs=id_reward,
            args=args,
            train_dataset=dataset,
            processing_class=word_tokenizer(size.vocab),
            peft_config=lora_config(settings),
        )
        self.trainer.current_gradient_accumulation_steps = 1
        self.optimizer = self.trainer.create_optimizer()
        self.batches = iter(self.trainer.get_train_dataloader())
        self.step_s: list[float] = []
        self.parts_s: dict[str, list[float]] = {"generate": [], "credit": []}
        self._current = dict.fromkeys(self.parts_s, 0.0)
        self._time("_generate", "generate")
        # The credit code: weights and diagnostics, plus the extra passes (matched adapter-off pass, the
        # dropout-free pass, `reuse`'s pass at beta = 0). arca_local's LoRA hooks run inside the loss forward.
        for method_name in ("_apply_credit", "_salience_pass", "_reference_pass", "_log_uniform_credit"):
            self._time(method_name, "credit")

    def _time(self, method_name: str, part: str) -> None:
        """Wrap a trainer method so the time spent in it is added to `part` for the current step."""
        inner = getattr(self.trainer, method_name)

        def timed(*args, **kwargs):
            start = self.clock()
            try:
                return inner(*args, **kwargs)
            finally:
                self._current[part] += self.clock() - start

        setattr(self.trainer, method_name, timed)

    def step(self, record: bool) -> None:
        batch = next(self.batches)
        self._current = dict.fromkeys(self.parts_s, 0.0)
        start = self.clock()
        self.trainer.training_step(self.trainer.model, batch, None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if record:
            self.step_s.append(self.clock() - start)
            for part, seconds in self._current.items():
                self.parts_s[part].append(seconds)
        for values in self.trainer._metrics.values():
            values.clear()

    def series(self) -> dict[str, list[float]]:
        """Seconds per measured round: whole step, outside generation, and inside the credit code."""
        outside = [s - g for s, g in zip(self.step_s, self.parts_s["generate"])]
        return {"step": self.step_s, "non_gen": outside, "credit": self.parts_s["credit"]}


def measure(
    beta: float,
    size: BenchSize,
    dataset: Dataset,
    workdir: Path,
    methods: tuple[str, ...] = METHODS,
    lora_dropout: float = 0.0,
    clock: Callable[[], float] = time.process_time,
) -> dict[str, dict[str, list[float]]]:
    """method -> `Stepper.series()`, with the methods stepped round-robin in a rotating order."""
    steppers = {m: Stepper(m, beta, size, dataset, workdir, lora_dropout, clock) for m in methods}
    order = list(methods)
    for round_index in range(size.warmup_rounds + size.rounds):
        for method in order:
            steppers[method].step(record=round_index >= size.warmup_rounds)
        order = order[1:] + order[:1]
    return {m: s.series() for m, s in steppers.items()}


def interval(ratio: tuple[float, float, float]) -> str:
    return f"{ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}]"


def table(results: dict[float, dict[str, dict[str, list[float]]]]) -> str:
    """Markdown table: per beta, median step ms and its paired ratio to uniform [95% interval], the same outside
    generation, and the median time spent in the credit code itself (signals, normalization, diagnostics,
    extra pass)."""
    head = "| method |" + "".join(f" β={b} step ms | ratio | non-gen ms | non-gen ratio | credit ms |" for b in results)
    lines = [head, "|" + " --- |" * (1 + 5 * len(results))]
    for method in next(iter(results.values())):
        cells = []
        for timings in results.values():
            ours, base = timings[method], timings["uniform"]
            cells += [
                f"{1e3 * statistics.median(ours['step']):.0f}",
                interval(paired_ratio(ours["step"], base["step"])),
                f"{1e3 * statistics.median(ours['non_gen']):.0f}",
                interval(paired_ratio(ours["non_gen"], base["non_gen"])),
                f"{1e3 * statistics.median(ours['credit']):.1f}",
            ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="vocab 8k, 16-token completions, 16 rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--methods", type=method_list, default=METHODS, help="comma-separated subset (default: all)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (steadier ratios on a busy machine)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="cpu", help="cpu: this process's CPU time (default); wall: elapsed"
    )
    parser.add_argument(
        "--lora-dropout", type=float, default=0.0, help="LoRA dropout (> 0 adds the dropout-free salience pass)"
    )
    options = parser.parse_args()
    size = QUICK if options.quick else FULL
    if options.rounds is not None:
        size = replace(size, rounds=max(1, options.rounds))
    torch.set_num_threads(options.threads)
    logging.disable(logging.WARNING)  # TRL/transformers notices and deprecation warnings would bury the table
    warnings.simplefilter("ignore")
    words = [f"w{i}" for i in range(size.vocab - len(SPECIAL_TOKENS))]
    rows = size.warmup_rounds + size.rounds
    generator = torch.Generator().manual_seed(0)
    prompts = [
        " ".join(words[j] for j in torch.randint(len(words), (size.prompt_words,), generator=generator).tolist())
        for _ in range(2 * rows)
    ]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    start = time.perf_counter()
    clock = CLOCKS[options.clock]
    with tempfile.TemporaryDirectory() as workdir:
        results = {
            beta: measure(beta, size, dataset, Path(workdir), options.methods, options.lora_dropout, clock)
            for beta in BETAS
        }
    print(
        f"CPU, {torch.get_num_threads()} threads, {options.clock} clock, vocab {size.vocab}, hidden 256, 4 layers, "
        f"LoRA r8 on all linear, LoRA dropout {options.lora_dropout}"
    )
    print(
        f"2 prompts x 4 completions of {size.completion_tokens} tokens per step; medians of {size.rounds} rounds, "
        f"ratios with 95% bootstrap intervals over rounds"
    )
    print(table(results))
    print(f"total {time.perf_counter() - start:.0f} s")
    for method in ("arca", "arca_local"):
        if method in options.methods:
            ratio = {b: paired_ratio(t[method]["step"], t["uniform"]["step"]) for b, t in results.items()}
            print(f"{method}/uniform step time: beta>0 {interval(ratio[0.04])}, beta=0 {interval(ratio[0.0])}")


def method_list(text: str) -> tuple[str, ...]:
    """`--methods a,b`: known methods, `uniform` first (the baseline of every ratio or difference)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return ("uniform", *dict.fromkeys(m for m in names if m != "uniform"))


if __name__ == "__main__":
    main()
