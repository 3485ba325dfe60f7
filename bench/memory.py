"""Peak memory of a training step per credit method against `uniform`, each method in its own process.

    python -m bench.memory [--quick] [--methods uniform,arca,kl] [--steps N] [--repeats R]

The trainer of `bench.step_overhead.Stepper` (the same Qwen3-shaped model, tokenizer, LoRA r8 and batch of 2
prompts x 4 completions; vocab 8k and 16-token completions with --quick, 32k and 64 without) in one fresh process
per method, beta (0.04 and 0) and repeat, so no method inherits another's allocations. There: one warm-up step
(AdamW's states, TRL's and torch's caches), then `--steps` measured steps (default 1: every step has the same
shape), with the peak reset at the start of each and at every phase boundary.

- CPU (Linux): the peak is VmHWM from /proc/self/status (reset by writing 5 to /proc/self/clear_refs), less
  VmRSS just before the step: what the step adds on top of the weights, optimizer states and everything else
  that lives between steps. glibc is told (`mallopt`) to map every block >= 64 KiB on its own and trim its heap,
  so RSS follows the live tensors (without it, repeats of one method differed by up to 23 MiB; with it, <= 0.7).
- CUDA: `torch.cuda.max_memory_allocated` (reset by `reset_peak_memory_stats`) less `memory_allocated` before
  the step: the same quantity from torch's allocator.

Printed: a table, per method and beta, of the step's peak and its difference to uniform's, the same for the
stretch of the step inside the credit code (`CREDIT_CODE`: signals, the matched adapter-off pass, the dropout-free
pass; a stretch's peak includes what the step already holds), and `spread`, the largest max - min over the
repeats of one method (the measurement's noise); then the summary line

    peak memory: arca +X MiB over uniform (beta>0), +Y MiB (beta=0)

X (beta = 0.04) and Y (beta = 0): arca's step peak minus uniform's, means over the repeats, i.e. the memory
a training step of arca needs beyond one of uniform on this model (what decides whether it fits a GPU). A
difference inside the spread is noise. `--repeats` (default 2) processes per method and beta; with --quick only
uniform and arca are repeated (the others run once, `-` in the spread column), which keeps it at ~2 minutes.
The credit code runs before the loss forward and frees its temporaries, so a method's extra memory shows in
the step's peak only where it outgrows the loss's own peak; the credit columns show it where it happens.

Processes are forked from the parent, which imports torch, TRL and the bench once (an import costs ~15 s on a
busy 2-core machine, a measurement ~3 s); `python -m bench.memory --one METHOD --beta B [--quick]` runs one
measurement in a process of its own and prints its JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import multiprocessing
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from arca.methods import METHODS
from bench.step_overhead import FULL, QUICK, BenchSize, method_list  # imported before any fork, shared by every child

BETAS = (0.04, 0.0)
PAIR = ("uniform", "arca")  # the summary line's methods: repeated even in --quick
MIB = 2**20


def _proc_status_kib(field: str) -> int:
    """`VmRSS` / `VmHWM` of this process in KiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: RSS peaks need Linux")


def _exact_malloc() -> None:
    """Make RSS follow the live allocations: glibc serves every block >= 64 KiB (any tensor of note) from its
    own mmap, unmapped on free, and trims the heap top at once, instead of keeping freed memory in pools whose
    size depends on the order of earlier allocations (without this, repeats of one method differ by up to 23 MiB)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters (malloc.h)
    if not (libc.mallopt(m_mmap_threshold, 64 * 1024) and libc.mallopt(m_trim_threshold, 128 * 1024)):
        raise RuntimeError("mallopt failed: RSS peaks need glibc")


class PeakMeter:
    """Current and peak memory of this process: torch's allocator on CUDA, RSS (/proc/self/status) on the CPU."""

    def __init__(self, cuda: bool) -> None:
        import torch

        self.cuda, self.torch = cuda, torch
        self.kind = "cuda" if cuda else "cpu"

    def now(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.memory_allocated()
        return _proc_status_kib("VmRSS") * 1024

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated()
        return _proc_status_kib("VmHWM") * 1024


# The trainer methods that are the credit code, as bench.step_overhead.Stepper times them.
CREDIT_CODE = ("_apply_credit", "_salience_pass", "_reference_pass", "_log_uniform_credit")


class Phases:
    """Peaks per phase of a step, over the memory before the step: `generate` (TRL's `_generate`), `credit` (the
    credit code, `CREDIT_CODE`, outermost call) and `rest` (everything else: scoring, loss forward and backward,
    AdamW); `process` is the absolute peak. A phase's peak includes what earlier phases still hold."""

    def __init__(self, meter: PeakMeter) -> None:
        self.meter = meter
        self.peaks = {"generate": 0, "credit": 0, "rest": 0, "process": 0}
        self.stack = ["rest"]
        self.before = 0
        self.entered: set[str] = set()  # phases a measured step went through (no credit code: `top_entropy`)

    def _switch(self, phase: str | None) -> None:
        """Close the current phase's stretch (its peak recorded) and open `phase`'s (None: the step ended)."""
        peak = self.meter.peak()
        current = self.stack[-1]
        self.peaks[current] = max(self.peaks[current], peak - self.before)
        self.peaks["process"] = max(self.peaks["process"], peak)
        self.meter.reset()
        if phase is None:
            self.stack.pop()
        else:
            self.stack.append(phase)
            self.entered.add(phase)

    def start(self) -> None:
        self.before = self.meter.now()
        self.stack = ["rest"]
        self.meter.reset()

    def stop(self) -> None:
        self._switch(None)

    def wrap(self, obj: object, name: str, phase: str) -> None:
        inner = getattr(obj, name)

        def metered(*args, **kwargs):
            self._switch(phase)
            try:
                return inner(*args, **kwargs)
            finally:
                self._switch(None)

        setattr(obj, name, metered)


def measure_one(method: str, beta: float, size: BenchSize, steps: int) -> dict[str, float]:
    """In this process: build the bench trainer for `method`, warm it up, measure `steps` steps. Returns MiB: the
    step's peak over the memory before it (`step_mib`), and the peaks of its phases (`Phases`: `generate`,
    `credit`, None where no credit code ran, and `rest`), each the largest over the measured steps, and the
    process's absolute peak (`process`)."""
    import torch
    from datasets import Dataset

    from arca.models.tiny import SPECIAL_TOKENS
    from bench.step_overhead import Stepper

    torch.set_num_threads(1)
    _exact_malloc()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    words = [f"w{i}" for i in range(size.vocab - len(SPECIAL_TOKENS))]
    generator = torch.Generator().manual_seed(0)  # prompts as bench.step_overhead draws them (2 per step)
    prompts = [
        " ".join(words[j] for j in torch.randint(len(words), (size.prompt_words,), generator=generator).tolist())
        for _ in range(2 * (steps + 1))
    ]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    with tempfile.TemporaryDirectory() as workdir:
        stepper = Stepper(method, beta, size, dataset, Path(workdir))
        meter = PeakMeter(next(stepper.trainer.model.parameters()).is_cuda)
        phases = Phases(meter)
        phases.wrap(stepper.trainer, "_generate", "generate")
        for name in CREDIT_CODE:
            phases.wrap(stepper.trainer, name, "credit")
        phases.start()
        stepper.step(record=False)  # warm-up: optimizer states and caches exist from here on
        phases.stop()
        phases.peaks, phases.entered = dict.fromkeys(phases.peaks, 0), set()
        for _ in range(steps):
            phases.start()
            stepper.step(record=True)
            phases.stop()
    peaks = {phase: peak / MIB for phase, peak in phases.peaks.items()}
    step = max(peaks["generate"], peaks["credit"], peaks["rest"])
    if "credit" not in phases.entered:
        peaks["credit"] = None
    return {"step_mib": step, **peaks, "device": meter.kind}


def run_one(method: str, beta: float, size: BenchSize, steps: int) -> dict[str, float]:
    """`measure_one` in a fresh process: forked from this one, which has imported torch, TRL and the bench once
    (an import takes ~15 s on a busy 2-core machine, the measurement ~3 s), so no allocation of one measurement
    is seen by another. `python -m bench.memory --one METHOD --beta B` runs the same measurement from scratch."""
    with multiprocessing.get_context("fork").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(measure_one, (method, beta, size, steps))


def measure_all(
    methods: tuple[str, ...], size: BenchSize, steps: int, repeats: int, repeat_all: bool = True
) -> dict[float, dict[str, list[dict[str, float]]]]:
    """beta -> method -> one result per process, in rounds (every method once, then again). Every method runs
    `repeats` times, or with `repeat_all` False only `PAIR` (the summary line's; the others once)."""
    results: dict[float, dict[str, list[dict[str, float]]]] = {b: {m: [] for m in methods} for b in BETAS}
    for round_index in range(repeats):
        for beta in BETAS:
            for method in methods:
                if round_index == 0 or repeat_all or method in PAIR:
                    results[beta][method].append(run_one(method, beta, size, steps))
    return results


def _mean(runs: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in runs]
    return None if None in values else statistics.mean(values)


def over_uniform(results: dict[str, list[dict[str, float]]], method: str, key: str = "step_mib") -> float | None:
    """Mean peak (`key`) of `method` minus uniform's (MiB); None where either has none (no credit code ran)."""
    ours, base = _mean(results[method], key), _mean(results["uniform"], key)
    return None if ours is None or base is None else ours - base


def spread(runs: list[dict[str, float]]) -> float | None:
    """The largest max - min, over the step and credit peaks, of one method's repeats (MiB): the measurement's
    noise; None for a single process."""
    if len(runs) < 2:
        return None
    keys = [k for k in ("step_mib", "credit") if runs[0][k] is not None]
    return max(max(r[k] for r in runs) - min(r[k] for r in runs) for k in keys)


def table(results: dict[float, dict[str, list[dict[str, float]]]]) -> str:
    """Markdown: per beta, the step's peak (mean of the processes) and its difference to uniform's, the same for
    the credit code's stretch of the step (`-`: the method runs none), and the processes' spread."""
    head = "| method |" + "".join(
        f" β={b} step peak MiB | over uniform | credit peak MiB | over uniform | spread |" for b in results
    )
    lines = [head, "|" + " --- |" * (1 + 5 * len(results))]
    for method in next(iter(results.values())):
        cells = []
        for by_method in results.values():
            runs = by_method[method]
            cells += [
                _cell(_mean(runs, "step_mib"), ".1f"),
                _cell(over_uniform(by_method, method), "+.1f"),
                _cell(_mean(runs, "credit"), ".1f"),
                _cell(over_uniform(by_method, method, "credit"), "+.1f"),
                _cell(spread(runs), ".1f"),
            ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(round(value, 1) + 0.0, spec)  # + 0.0: no "-0.0"


def summary_line(results: dict[float, dict[str, list[dict[str, float]]]]) -> str:
    """`peak memory: arca +X MiB over uniform (beta>0), +Y MiB (beta=0)` (signed, one decimal)."""
    x, y = (round(over_uniform(results[b], "arca"), 1) + 0.0 for b in BETAS)  # + 0.0: no "-0.0"
    return f"peak memory: arca {x:+.1f} MiB over uniform (beta>0), {y:+.1f} MiB (beta=0)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="vocab 8k and 16-token completions (bench.step_overhead)")
    parser.add_argument("--methods", type=method_list, default=METHODS, help="comma-separated subset (default: all)")
    parser.add_argument("--steps", type=int, default=1, help="measured steps per process, after one warm-up")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="processes per method and beta (their spread: the noise); --quick: uniform and arca only",
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child: one method, one beta
    parser.add_argument("--beta", type=float, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    size = QUICK if options.quick else FULL
    if options.steps < 1 or options.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    if options.one is not None:
        if options.one not in METHODS or options.beta is None:
            parser.error(f"--one needs a method of {', '.join(METHODS)} and --beta")
        print(json.dumps(measure_one(options.one, options.beta, size, options.steps)))
        return
    if "arca" not in options.methods:
        options.methods = (*options.methods, "arca")  # the summary line's method
    start = time.perf_counter()
    results = measure_all(options.methods, size, options.steps, options.repeats, not options.quick)
    device = next(iter(results[BETAS[0]].values()))[0]["device"]
    print(
        f"{device}, vocab {size.vocab}, {size.completion_tokens}-token completions, hidden 256, "
        f"4 layers, LoRA r8; 2 prompts x 4 completions per step; peak over {options.steps} step(s) after a "
        f"warm-up less the memory before ({'RSS' if device == 'cpu' else 'torch allocator'}), mean of "
        f"{options.repeats} processes per method and beta{' (uniform and arca; the others 1)' if options.quick else ''}"
        "; spread: the largest max - min of those"
    )
    print(table(results))
    print(f"total {time.perf_counter() - start:.0f} s")
    print(summary_line(results))


if __name__ == "__main__":
    main()
