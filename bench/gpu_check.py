"""GPU check before the first paper run: the paper profile's training step at full size, on random weights.

    python -m bench.gpu_check [--json out.json]   # first run: uniform and arca, 2 steps each, < 5 min on one GPU
    python -m bench.gpu_check --full              # every method of METHODS, 3 steps each (~8 min)
    python -m bench.gpu_check [--steps N] [--methods uniform,arca,...]   # any other choice
    python -m bench.gpu_check --betas 0.04   # also each method's peak memory at beta 0.04 (each trains again)
    python -m bench.gpu_check --tiny      # the same code path on CPU in about a minute (the test suite runs it)

Needs what the pipeline's train stage needs, since it trains through it (`REQUIRES`; `make setup`, i.e. `pip
install -c constraints.txt -e '.[pipeline]'`, installs them, vLLM not among them); a missing one is named
before anything loads. The torch build must match the machine's NVIDIA driver (docs/profiles.md, GPU section).

Qwen3-1.7B's architecture (bench/qwen3_1_7b_base_config.json, the hub config of Qwen/Qwen3-1.7B-Base) with random
weights in bfloat16, a synthetic word-level tokenizer of the same vocabulary size (151,936), raw-text prompts of
`PROMPT_WORDS` tokens: nothing is downloaded. Each method trains `--steps` optimizer steps through the pipeline's
own `arca.run.training.run_training`, with exactly the settings `stages.train` reads from conf/profile/paper.yaml
(r = 64, alpha 128, dropout 0.05, 2 prompts x 4 completions per micro-batch, gradient accumulation 4, lr schedule,
sharpening 2, salience dropout on), so a step is the pipeline's step: generation of 32 completions, scoring
passes, 4 loss forwards and backwards, AdamW. The reward is a function of the token ids (a random model earns
none from a grader), so advantages and LoRA updates are never zero.

The second-to-last line is bench/memory.py's `peak memory: arca +X MiB over uniform (beta>0), +Y MiB (beta=0)`:
each method's `torch.cuda.max_memory_allocated` (peak statistics reset before it trains) minus uniform's, at the
profile's beta (0) and at each of `--betas`; `n/a` for a beta not run and on the CPU (every method trains in
this one process, so an RSS peak would not be the method's own; bench/memory.py is the CPU measurement).
The JSON holds them per beta and method (`peak_mib`, `peak_over_uniform_mib`).

The last line says, for the measured steps (the first step is a warm-up): median step time per method and its
ratio to `uniform`, peak GPU memory (and each method's over uniform's), the step-0 fallback rate of each
non-uniform method (LoRA B = 0 at the first step: must be 1.00 in bf16, SPEC 2b), the bf16 noise share
`||a - a32|| / ||a32||` of the arca, arca_local and divergence saliences at the last step (the trainer's noise
probe), and the generated tokens per second of a whole training step and of generation alone (the figures
`stages.plan --gpu-check` plans with).

Then evaluation's decoding (`decode_rates`): greedy HF `generate` of a batch of `DECODE_BATCH` sequences with the
paper's LoRA unmerged and merged into a copy (`arca.sampling.merged.merged_copy`, what `arca.sampling.evaluation`
decodes with), in generated tokens per second: the planner's evaluation figure.

Left out: vLLM (bench/vllm_check.py, which `make gpu-check` runs next), flash attention and several GPUs (the
paper uses none); dump throughput (the planner takes training's generation alone for it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import io
import json
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The packages a run needs beyond the standard library (import names), named before an ImportError would be.
REQUIRES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "math_verify", "pandas", "pyarrow")
REQUIRES += ("yaml", "click")  # no DVC or Hydra: `paper_params` composes the profile as they would
_missing = [name for name in REQUIRES if importlib.util.find_spec(name) is None]
if _missing:
    raise SystemExit(
        f"bench.gpu_check needs {', '.join(_missing)} (of {', '.join(REQUIRES)}): run `make setup`, or "
        "`pip install -c constraints.txt -e '.[pipeline]'` with the torch build for this machine's driver"
    )

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3Config, TrainerCallback  # noqa: E402

from arca.credit.config import METHOD_FIELDS  # noqa: E402
from arca.grpo.trainer import CreditGRPOTrainer  # noqa: E402
from arca.models.tiny import tiny_model  # noqa: E402
from arca.run.training import lora_config, run_training  # noqa: E402
from arca.sampling.merged import merged_copy  # noqa: E402
from bench.step_overhead import id_reward, word_tokenizer  # noqa: E402
from stages.train import settings_from_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "bench" / "qwen3_1_7b_base_config.json"
PROFILE = ROOT / "conf" / "profile" / "paper.yaml"  # a complete profile: its YAML is the composed params
METHODS = ("uniform", "arca", "arca_local", "divergence")  # --full
FIRST = ("uniform", "arca")  # the first run's default: the paper profile's first two runs, 2 steps each
DECODE_BATCH, DECODE_TOKENS = 64, 64  # evaluation's decoding check: sequences x new tokens (greedy, forced)
NOISE_SIGNALS = ("arca", "arca_local", "divergence")
RANK, SEED = 64, 1337  # the paper's main rank and seed
PROMPT_WORDS = 160  # a MATH problem in the paper's raw prompt is ~100-250 tokens


@dataclasses.dataclass(frozen=True)
class Size:
    """What differs between the device check and its CPU rehearsal (`--tiny`)."""

    name: str
    vocab: int
    completion_tokens: int
    prompt_words: int


FULL = Size("Qwen3-1.7B", vocab=151936, completion_tokens=512, prompt_words=PROMPT_WORDS)
TINY = Size("tiny Qwen3", vocab=512, completion_tokens=8, prompt_words=24)


def paper_params() -> dict[str, Any]:
    """conf/profile/paper.yaml as `dvc exp run -S profile=paper` composes it, without DVC or Hydra (the device
    machine has neither): the profile's shared `credit:` keys copied into one block per method, as
    conf/credit_methods/default.yaml interpolates them (tests/test_gpu_check.py compares it with the composition)."""
    params = yaml.safe_load(PROFILE.read_text())
    credit = params["credit"]
    given = credit.get("methods") or {}
    credit["methods"] = {
        method: {key: credit[key] for key in fields} | dict(given.get(method) or {})
        for method, fields in METHOD_FIELDS.items()
    }
    return params


def build_model(size: Size, device: torch.device) -> torch.nn.Module:
    """Random weights, seeded, so every method starts from the same model."""
    torch.manual_seed(0)
    if size is TINY:
        return tiny_model(size.vocab).to(device=device, dtype=torch.bfloat16)
    config = Qwen3Config.from_json_file(CONFIG)
    with torch.device(device):  # initialize on the GPU: ~10x faster than on the CPU, no host copy
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def write_prompts(path: Path, size: Size, n: int) -> None:
    """A train.parquet as `prepare` writes it: raw-text prompts of random words (no chat template)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(8, size.vocab - 4, (n, size.prompt_words), generator=generator)  # words w0..w(vocab-5)
    prompts = [" ".join(f"w{i}" for i in row.tolist()) for row in ids]
    frame = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(n)], "prompt": prompts, "answer": ["0"] * n})
    frame.to_parquet(path, index=False)


class StepRecorder(TrainerCallback):
    """Wall time of every optimizer step (the GPU synchronized at both ends) and every logged metrics row."""

    def __init__(self) -> None:
        self.step_s: list[float] = []
        self.logs: list[dict[str, float]] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        _synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()
        self.step_s.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@contextlib.contextmanager
def generation_timer() -> Iterator[list[float]]:
    """Seconds spent in TRL's `_generate`, one entry per call (one call per optimizer step here)."""
    seconds: list[float] = []
    original = CreditGRPOTrainer._generate

    def timed(self, *args, **kwargs):
        _synchronize()
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            _synchronize()
            seconds.append(time.perf_counter() - start)

    CreditGRPOTrainer._generate = timed
    try:
        yield seconds
    finally:
        CreditGRPOTrainer._generate = original


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow the Trainer's progress bars and printed log dicts; show their tail if the run fails."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        print(captured.getvalue()[-4000:])
        raise


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(
    method: str, size: Size, steps: int, workdir: Path, device: torch.device, beta: float | None = None
) -> dict[str, Any]:
    """Train `steps` steps of `method` with the paper profile's settings (its beta, or `beta`); timings, peak
    memory (the peak statistics reset first, so it is this method's own) and the logged credit."""
    params = paper_params()  # the profile as DVC composes it (per-method credit blocks included)
    run_dir = workdir / (method if beta is None else f"{method}-beta{beta}")
    settings, credit = settings_from_params(params, method, RANK, SEED, run_dir)
    settings = dataclasses.replace(
        settings,
        beta=settings.beta if beta is None else beta,
        train_path=workdir / "train.parquet",
        max_steps=steps,
        max_completion_length=size.completion_tokens,
        save_steps=steps + 1,  # no optimizer checkpoint: writing one is not the step being timed
        device=device.type,  # the profile says cuda; the CPU rehearsal (--tiny) trains on the CPU
    )
    model = build_model(size, device)
    recorder = StepRecorder()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with generation_timer() as generate_s, quiet():
        run_training(
            settings,
            credit,
            model,
            word_tokenizer(size.vocab),
            reward_funcs=[id_reward],
            callbacks=[recorder],
        )
    rollouts = settings.prompts_per_step * settings.num_generations
    # CPU: None, not an RSS figure: every method trains in this one process, so its RSS peak is not the method's
    # own (bench/memory.py measures the CPU peaks, one process per method).
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    measured = slice(1, None) if steps > 1 else slice(None)  # step 1 warms up kernels and allocator
    return {
        "step_s": statistics.median(recorder.step_s[measured]),
        "generate_s": statistics.median(generate_s[measured]),
        "tokens_per_step": rollouts * size.completion_tokens,
        "peak_gib": peak,
        "fallback_step0": recorder.logs[0].get("credit/fallback_rate", float("nan")) if recorder.logs else float("nan"),
        "noise": {s: _last(recorder.logs, f"credit/noise_{s}") for s in NOISE_SIGNALS},
    }


@torch.no_grad()
def decode_rates(size: Size, device: torch.device) -> dict[str, float]:
    """Generated tokens/s of greedy HF decoding, `DECODE_BATCH` x `DECODE_TOKENS` new tokens, with the paper's LoRA
    (r = 64 on every linear layer, B random so the adapter is not a no-op) unmerged and merged into a copy."""
    settings, _ = settings_from_params(paper_params(), "uniform", RANK, SEED, Path("unused"))
    model = get_peft_model(build_model(size, device), lora_config(settings)).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=1e-3)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(8, size.vocab - 4, (DECODE_BATCH, size.prompt_words), generator=generator).to(device)
    rates = {}
    for name, decoder in (("unmerged", model), ("merged", merged_copy(model))):
        for tokens in (2, DECODE_TOKENS):  # a 2-token warm-up, then the timed decode
            _synchronize()
            start = time.perf_counter()
            decoder.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=tokens,
                min_new_tokens=tokens, pad_token_id=0,
            )  # fmt: skip
            _synchronize()
        rates[name] = DECODE_BATCH * DECODE_TOKENS / (time.perf_counter() - start)
        del decoder
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rates


def _last(logs: list[dict[str, float]], key: str) -> float:
    values = [row[key] for row in logs if key in row]
    return float(values[-1]) if values else float("nan")


def memory_columns(memory: dict[float, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per beta (a string key, for JSON) and method: the peak in MiB and its difference to uniform's peak at that
    beta (None on the CPU, or without a uniform run at that beta)."""
    peaks: dict[str, dict[str, float | None]] = {}
    over: dict[str, dict[str, float | None]] = {}
    for beta, by_method in memory.items():
        mib = {
            m: None if r["peak_gib"] != r["peak_gib"] else round(r["peak_gib"] * 1024, 1) for m, r in by_method.items()
        }
        base = mib.get("uniform")
        peaks[str(beta)] = mib
        over[str(beta)] = {m: None if v is None or base is None else round(v - base, 1) for m, v in mib.items()}
    return {"peak_mib": peaks, "peak_over_uniform_mib": over}


def memory_line(s: dict[str, Any]) -> str:
    """`peak memory: arca +X MiB over uniform (beta>0), +Y MiB (beta=0)`, as bench/memory.py prints it: the
    first beta > 0 measured and beta = 0; `n/a` where that beta was not run (`--betas`), or on the CPU."""
    over = s.get("peak_over_uniform_mib", {})
    positive = next((b for b in over if float(b) > 0), None)
    x = over.get(positive, {}).get("arca") if positive else None
    y = over.get("0.0", {}).get("arca")
    fmt = lambda v: "n/a" if v is None else f"{v:+.1f} MiB"  # noqa: E731
    return f"peak memory: arca {fmt(x)} over uniform (beta>0), {fmt(y)} (beta=0)"


def summary(
    results: dict[str, dict[str, Any]],
    size: Size,
    device: str,
    steps: int,
    decode: dict[str, float],
    memory: dict[float, dict[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The numbers of the final line, as JSON-ready values; `memory`: beta -> method -> `measure`'s result (the
    peak memory columns; default: `results` alone, at the profile's beta)."""
    base = results["uniform"] if "uniform" in results else next(iter(results.values()))
    noise_run = results.get("arca", base)
    memory = memory or {float(paper_params()["train"]["beta"]): results}
    return {
        "device": device,
        "model": size.name,
        "beta": float(paper_params()["train"]["beta"]),  # the timed runs' (the profile's)
        "completion_tokens": size.completion_tokens,
        "measured_steps": max(1, steps - 1),
        "step_s": {m: round(r["step_s"], 3) for m, r in results.items()},
        "step_ratio": {m: round(r["step_s"] / base["step_s"], 3) for m, r in results.items()},
        "peak_gib": _finite(max(r["peak_gib"] for r in results.values())),
        "fallback_step0": {m: _finite(r["fallback_step0"]) for m, r in results.items() if m != "uniform"},
        "noise_share": {s: _finite(v) for s, v in noise_run["noise"].items()},
        "train_tokens_per_s": round(base["tokens_per_step"] / base["step_s"], 1),
        "generate_tokens_per_s": round(base["tokens_per_step"] / base["generate_s"], 1),
        "evaluate_tokens_per_s": round(decode["merged"], 1),  # evaluation decodes with the adapter merged
        "evaluate_unmerged_tokens_per_s": round(decode["unmerged"], 1),
        **memory_columns(memory),
    }


def _finite(value: float) -> float | None:
    """4 significant digits, None for NaN (strict JSON has no NaN; on the CPU there is no GPU memory)."""
    return None if value != value else float(f"{value:.4g}")


def final_line(s: dict[str, Any]) -> str:
    steps = ", ".join(
        f"{m} {t:.2f}" + ("" if m == "uniform" else f" ({s['step_ratio'][m]:.2f}x)") for m, t in s["step_s"].items()
    )
    fallback = ", ".join(f"{m} {_number(v, '.2f')}" for m, v in s["fallback_step0"].items())
    noise = ", ".join(f"{k} {_number(v, '.3g')}" for k, v in s["noise_share"].items())
    return (
        f"gpu_check: {s['device']}, {s['model']} bf16 random, r{RANK}, 2x4 per micro-batch x GA 4, "
        f"{s['completion_tokens']}-token completions | step s (median of {s['measured_steps']}): {steps} | "
        f"peak GPU memory {_gib(s['peak_gib'])}{_over(s)} | step-0 fallback (expect 1.00): {fallback} | "
        f"bf16 noise share at the last step: {noise} | tokens/s: train {s['train_tokens_per_s']:,.0f}, "
        f"generate {s['generate_tokens_per_s']:,.0f}, evaluation decoding {s['evaluate_tokens_per_s']:,.0f} "
        f"merged vs {s['evaluate_unmerged_tokens_per_s']:,.0f} unmerged"
    )


def _over(s: dict[str, Any]) -> str:
    """` (over uniform: arca +X MiB, ...)` at the profile's beta (the timed runs); empty on the CPU."""
    over = s.get("peak_over_uniform_mib", {}).get(str(s.get("beta")), {})
    cells = [f"{m} {v:+.0f} MiB" for m, v in over.items() if m != "uniform" and v is not None]
    return f" (over uniform: {', '.join(cells)})" if cells else ""


def _gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.1f} GiB"


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def check_plan(full: bool, steps: int | None, methods: str | None) -> tuple[int, list[str]]:
    """(steps per method, methods) of a check: the first run's 2 steps of `FIRST` (< 5 min on one GPU), or
    `--full`'s 3 steps of every method of `METHODS`; explicit `--steps` / `--methods` win."""
    chosen = methods or ",".join(METHODS if full else FIRST)
    return steps or (3 if full else 2), [m.strip() for m in chosen.split(",") if m.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen3 and 8-token completions, on the CPU")
    parser.add_argument("--full", action="store_true", help=f"every method ({', '.join(METHODS)}), 3 steps each")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 2, --full 3)")
    parser.add_argument("--methods", default=None, help=f"comma-separated (default {','.join(FIRST)}; --full all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here (for stages.plan)")
    parser.add_argument(
        "--betas",
        type=_betas,
        default=(),
        help="more KL betas to measure peak memory at, e.g. 0.04 (each method again)",
    )
    options = parser.parse_args()
    size = TINY if options.tiny else FULL
    if not options.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: the full check needs a GPU (use --tiny to rehearse it on the CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() and not options.tiny else "cpu")
    logging.disable(logging.WARNING)  # TRL/transformers notices would bury the result
    warnings.simplefilter("ignore")
    steps, methods = check_plan(options.full, options.steps, options.methods)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_prompts(workdir / "train.parquet", size, n=64)
        results = {}
        for method in methods:
            results[method] = measure(method, size, steps, workdir, device)
            print(f"{method}: {json.dumps(results[method])}", flush=True)
        memory = {float(paper_params()["train"]["beta"]): results}
        for beta in (b for b in options.betas if b not in memory):
            memory[beta] = {}
            for method in methods:
                memory[beta][method] = measure(method, size, steps, workdir, device, beta)
                print(f"{method} at beta {beta}: {json.dumps(memory[beta][method])}", flush=True)
    decode = decode_rates(size, device)
    print(f"evaluation decoding: {json.dumps(decode)}", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    result = summary(results, size, name, steps, decode, memory)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    if options.json:
        options.json.write_text(json.dumps(result, indent=2) + "\n")  # methods in run order
    print(f"total {result['wall_s']:.0f} s")
    print(memory_line(result))
    print(final_line(result))


def _betas(text: str) -> tuple[float, ...]:
    """`--betas 0.04,0.1`: KL coefficients >= 0."""
    try:
        betas = tuple(float(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--betas: comma-separated numbers, got {text!r}") from None
    if any(b < 0 for b in betas):
        raise argparse.ArgumentTypeError(f"--betas: every beta must be >= 0, got {text!r}")
    return betas


if __name__ == "__main__":
    main()
