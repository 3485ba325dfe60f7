"""Cost planner: what a profile will generate and roughly how many GPU-hours that takes, before anyone starts it.

    python -m stages.plan                                  # the active params (params.yaml)
    python -m stages.plan --profile paper [-S key=value]   # a profile of conf/, as `dvc exp run -S` composes it
    python -m stages.plan --profile study --train-tokens-per-s 1500 --generate-tokens-per-s 3000
    python -m stages.plan --gpu-check gpu_check.json       # the throughput `bench/gpu_check.py --json` measured

Counts are exact for rollouts and upper bounds for tokens (every completion at its max length): training
(steps x prompts x completions per run), the per-token dumps (probe prompts x samples at every saved snapshot),
evaluation (greedy + k samples per problem, base model included) and the counterfactual decodes of
`faithfulness` (SPEC 9: two greedy decodes per scored position, at the evaluation rate). GPU-hours = tokens /
throughput on one GPU, with three figures that bench/gpu_check.py measures: a whole training step's generated
tokens per second (generation, scoring passes, backward) for `train`, generation alone (LoRA unmerged, as TRL
and the dump sample) for `dump`, and greedy decoding with the adapter merged into a copy (what
`arca.sampling.evaluation` decodes with) for `evaluate`. Left out: the dumps' scoring passes, base-model download,
prepare, diagnose, the degeneration map, tables and figures (minutes, CPU).

Then the expected peak memory of one training process (`arca.run.memory`: an estimate from the model's
architecture, LoRA, micro-batch and lengths, the formula in its docstring and docs/profiles.md) for the run
that needs the most and per method; the architecture from `--model-config`, else the Qwen3-1.7B config in
bench/ for the GPU profiles' models, else the base model the pipeline materialized (data/models/base), else
"unknown model config". With `--gpu-check`, the peaks bench/gpu_check.py measured are printed beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from arca.run.memory import GIB, Architecture, Shape, peak_bytes
from stages.common import load_valid
from stages.schema import validate
from stages.strict import ParamsError

ROOT = Path(__file__).resolve().parents[1]
# Hub models whose architecture is Qwen3-1.7B's (the base and the post-trained model share it).
QWEN3_1_7B = ("Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-1.7B")
QWEN3_CONFIG = ROOT / "bench" / "qwen3_1_7b_base_config.json"
LOCAL_CONFIG = Path("data/models/base/config.json")  # what `stages.base` materialized for the active params
ASSUMED_PROMPT_TOKENS = 256  # `train.max_prompt_length: null` keeps every prompt: a MATH prompt is ~100-250

# Rows of a MATH split when `n` is null (upper bounds: rows without a boxed answer are dropped by prepare).
SPLIT_ROWS = {"train": 7500, "test": 5000, "math500": 500}
# Until bench/gpu_check.py has measured them (tokens/s on one GPU): HF generate on a 1.7B model in bf16 is bound
# by Python and kernel-launch overhead, ~25 ms per decoding step whatever the batch: 32 rollouts (a training
# step) -> ~1,300 tokens/s, less the training passes; evaluation batches of 64 -> ~2,500.
DEFAULT_TRAIN_TOKENS_PER_S = 1000.0
DEFAULT_GENERATE_TOKENS_PER_S = 2000.0
# Evaluation decodes with the LoRA merged (arca.sampling.merged): per step the model then launches the base model's
# kernels only, not ~4-6 more per LoRA module (196 modules on Qwen3-1.7B, ~as many as the base's own per token),
# so a host-bound decode takes about half the time: an estimate, until gpu_check measures it.
DEFAULT_EVALUATE_TOKENS_PER_S = 2 * DEFAULT_GENERATE_TOKENS_PER_S


@dataclass(frozen=True)
class Throughput:
    """Generated tokens per second on one GPU: in a whole training step, in generation alone (unmerged LoRA), and
    in evaluation's decoding (merged LoRA)."""

    train: float = DEFAULT_TRAIN_TOKENS_PER_S
    generate: float = DEFAULT_GENERATE_TOKENS_PER_S
    evaluate: float = DEFAULT_EVALUATE_TOKENS_PER_S


@dataclass(frozen=True)
class StageCost:
    """One stage kind summed over its runs: `rollouts` sequences generated, at most `tokens` new tokens."""

    stage: str
    runs: int
    rollouts: int
    tokens: int

    def gpu_hours(self, rate: Throughput) -> float:
        rates = {"train": rate.train, "evaluate": rate.evaluate, "faithful": rate.evaluate}  # SPEC 9 decodes: merged
        per_s = rates.get(self.stage, rate.generate)
        return self.tokens / per_s / 3600


def snapshot_steps(max_steps: int, save_steps: int) -> list[int]:
    """The adapter snapshots a run keeps (arca.run.files): step 0, every `save_steps`, and the last step."""
    return sorted({0, max_steps, *range(save_steps, max_steps + 1, save_steps)})


def split_rows(block: dict[str, Any], data: dict[str, Any], train: bool = False) -> int:
    """Problems a `data.train` / `data.eval.<set>` block selects: its n, else the whole split (upper bound)."""
    if block.get("n") is not None:
        return int(block["n"])
    if train:
        return SPLIT_ROWS["train"]
    split = block.get("split") or ("math500" if data.get("source") == "embedded" else "test")
    return SPLIT_ROWS[split]


def plan(params: dict[str, Any]) -> list[StageCost]:
    """Train, dump and evaluate costs of the runs in `study.runs` (and the base model's evaluation)."""
    runs = len(params["study"]["runs"])
    train, dump, evaluate, data = params["train"], params["dump"], params["evaluate"], params["data"]
    per_run = train["max_steps"] * train["prompts_per_step"] * train["num_generations"]
    snapshots = len(snapshot_steps(train["max_steps"], train["save_steps"]))
    probe = min(split_rows(data["probe"], data), split_rows(data["train"], data, train=True))
    dumped = snapshots * probe * dump["samples"]
    problems = sum(split_rows(block, data) for block in data["eval"].values())
    evaluated = problems * (1 + evaluate["k"])  # one greedy answer and k samples per problem
    costs = [
        StageCost("train", runs, runs * per_run, runs * per_run * train["max_completion_length"]),
        StageCost("dump", runs, runs * dumped, runs * dumped * train["max_completion_length"]),
        StageCost("evaluate", runs + 1, (runs + 1) * evaluated, (runs + 1) * evaluated * evaluate["max_new_tokens"]),
    ]
    if params.get("faithfulness"):
        costs.append(faithfulness_cost(params, probe * dump["samples"]))
    return costs


def faithfulness_cost(params: dict[str, Any], completions: int) -> StageCost:
    """SPEC 9's greedy decodes: per run and checkpoint of `faithfulness`, every probe completion x its scored
    positions (at most `max_positions`, every position of a completion up to the full length) x 2 (control and
    intervention), each continuing up to the completion budget (an upper bound: a decode from position t has
    `max_completion_length - t` tokens left; the mean is about half)."""
    block, length = params["faithfulness"], params["train"]["max_completion_length"]
    steps = block.get("steps", "final")
    checkpoints = 1 if steps == "final" else len(steps)
    decodes = len(block["runs"]) * checkpoints * completions * min(block["max_positions"], length) * 2
    return StageCost("faithful", len(block["runs"]), decodes, decodes * length)


def format_plan(params: dict[str, Any], costs: list[StageCost], rate: Throughput, source: str) -> str:
    train = params["train"]
    head = (
        f"profile {params.get('profile', '?')} ({source}): {len(params['study']['runs'])} runs x {train['max_steps']} "
        f"steps x {train['prompts_per_step']} prompts x {train['num_generations']} completions of <= "
        f"{train['max_completion_length']} tokens, {train.get('num_processes', 1)} process(es) per run"
    )
    rows = [f"{'stage':<10}{'runs':>6}{'rollouts':>12}{'tokens (<=)':>16}{'GPU-hours':>11}"]
    for cost in costs:
        rows.append(
            f"{cost.stage:<10}{cost.runs:>6}{cost.rollouts:>12,}{cost.tokens:>16,}{cost.gpu_hours(rate):>11.1f}"
        )
    total_tokens = sum(c.tokens for c in costs)
    total = sum(c.gpu_hours(rate) for c in costs)
    rows.append(f"{'total':<10}{'':>6}{sum(c.rollouts for c in costs):>12,}{total_tokens:>16,}{total:>11.1f}")
    foot = (
        f"at {rate.train:,.0f} generated tokens/s per GPU in training, {rate.generate:,.0f} in generation alone, "
        f"{rate.evaluate:,.0f} in evaluation (adapter merged) (--train-tokens-per-s / --generate-tokens-per-s / "
        "--evaluate-tokens-per-s, or --gpu-check with bench/gpu_check.py's JSON)"
    )
    return "\n".join([head, *rows, foot])


def throughput(
    train: float | None, generate: float | None, gpu_check: str | None, evaluate: float | None = None
) -> Throughput:
    """The figures to plan with: the options, else what bench/gpu_check.py measured, else the defaults (an older
    gpu_check JSON without the evaluation figure: twice its generation figure, as the defaults assume)."""
    measured = json.loads(Path(gpu_check).read_text()) if gpu_check else {}
    generate = generate or measured.get("generate_tokens_per_s", DEFAULT_GENERATE_TOKENS_PER_S)
    return Throughput(
        train=train or measured.get("train_tokens_per_s", DEFAULT_TRAIN_TOKENS_PER_S),
        generate=generate,
        evaluate=evaluate or measured.get("evaluate_tokens_per_s", 2 * generate),
    )


def _model_config(params: dict[str, Any], explicit: str | None, active: bool) -> tuple[dict[str, Any] | None, str]:
    """(config.json as a dict, where it came from), or (None, why not)."""
    model = params["model"]
    if explicit:
        return json.loads(Path(explicit).read_text()), explicit
    if model.get("profile") == "hub" and model.get("hub_id") in QWEN3_1_7B:
        return json.loads(QWEN3_CONFIG.read_text()), str(QWEN3_CONFIG.relative_to(ROOT))
    if active and LOCAL_CONFIG.exists():
        return json.loads(LOCAL_CONFIG.read_text()), str(LOCAL_CONFIG)
    return None, "unknown model config (no data/models/base/config.json: `dvc repro base`, or --model-config)"


def training_shape(params: dict[str, Any], rank: int) -> tuple[Shape, list[str]]:
    """One training process's batch shape at `rank`, and the assumptions made."""
    train, lora, notes = params["train"], params["lora"], []
    processes = int(train.get("num_processes", 1))
    per_step = train["prompts_per_step"] * train["num_generations"]
    prompt = train.get("max_prompt_length")
    if prompt is None:
        prompt = ASSUMED_PROMPT_TOKENS
        notes.append(f"prompts assumed {prompt} tokens (train.max_prompt_length is null)")
    dtype = params["model"]["dtype"]
    if dtype == "auto":
        dtype = "float32" if train.get("device") == "cpu" else "bfloat16"
    shape = Shape(
        micro_batch=max(1, per_step // (train["gradient_accumulation_steps"] * processes)),
        rollouts=max(1, per_step // processes),
        prompt_tokens=int(prompt),
        completion_tokens=int(train["max_completion_length"]),
        dtype=dtype,
        rank=rank,
        targets=lora["target_modules"] if isinstance(lora["target_modules"], str) else tuple(lora["target_modules"]),
        lora_dropout=float(lora.get("dropout") or 0.0),
        gradient_checkpointing=bool(train.get("gradient_checkpointing")),
    )
    return shape, notes


def format_memory(params: dict[str, Any], config: dict[str, Any] | None, source: str, gpu_check: str | None) -> str:
    """The planner's memory lines: the estimate for the run that needs the most and per method, and the peaks
    bench/gpu_check.py measured when its JSON is given."""
    lines = []
    if config is None:
        lines.append(f"peak memory per training process: {source}")
    else:
        arch = Architecture.from_config(config)
        peaks, largest = {}, None
        for run, spec in params["study"]["runs"].items():
            shape, notes = training_shape(params, int(spec["rank"]))
            terms = peak_bytes(arch, shape, spec["method"])
            peaks[spec["method"]] = max(peaks.get(spec["method"], 0), terms["peak"])
            if largest is None or terms["peak"] > largest[1]["peak"]:
                largest = (run, terms, shape, notes)
        run, terms, shape, notes = largest
        where = "GPU" if params["train"].get("device") != "cpu" else "CPU"
        gib = {k: v / GIB for k, v in terms.items()}
        lines.append(
            f"peak {where} memory per training process (estimate, arca/run/memory.py, model config {source}): "
            f"{gib['peak']:.1f} GiB for {run} ({shape.dtype}, micro-batch {shape.micro_batch} x "
            f"{shape.prompt_tokens} + {shape.completion_tokens} tokens, r{shape.rank}, gradient checkpointing "
            f"{'on' if shape.gradient_checkpointing else 'off'}) = weights {gib['weights']:.1f} + LoRA, gradients and "
            f"AdamW {gib['lora_state']:.1f} + max(generation KV cache {gib['generation']:.1f}, training pass "
            f"{gib['activations'] + gib['head_chunk'] + gib['method']:.1f}: activations {gib['activations']:.1f}, "
            f"LM-head tile {gib['head_chunk']:.2f}, method {gib['method']:.2f})"
            + (f"; {'; '.join(notes)}" if notes else "")
            + (
                "; on the CPU TRL's LM head runs unfused over every position: bench/memory.py measured 2-5x the "
                "training pass on its model"
                if where == "CPU"
                else ""
            )
        )
        lines.append(
            "  by method (largest rank): " + ", ".join(f"{m} {p / GIB:.1f}" for m, p in peaks.items()) + " GiB"
        )
    if gpu_check:
        measured = json.loads(Path(gpu_check).read_text())
        if measured.get("peak_gib") is None:
            lines.append(f"measured ({gpu_check}): no peak GPU memory (a CPU rehearsal)")
        else:
            over = measured.get("peak_over_uniform_mib", {})
            cells = [
                f"{m} {v:+.0f} MiB at beta {b}" for b, row in over.items() for m, v in row.items() if m != "uniform"
            ]
            lines.append(
                f"measured ({gpu_check}, {measured['device']}, {measured['model']}, paper profile at r64): peak "
                f"{measured['peak_gib']:.1f} GiB" + (f"; over uniform: {', '.join(cells)}" if cells else "")
            )
    return "\n".join(lines)


@click.command()
@click.option("--profile", default=None, help="a profile of conf/profile/ (default: the active params.yaml)")
@click.option("-S", "--set-param", "overrides", multiple=True, help="Hydra override, as `dvc exp run -S`")
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--train-tokens-per-s", "train_rate", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--generate-tokens-per-s", "generate_rate", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--evaluate-tokens-per-s", "evaluate_rate", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--gpu-check", type=click.Path(exists=True, dir_okay=False), help="JSON of `bench.gpu_check --json`")
@click.option(
    "--model-config", type=click.Path(exists=True, dir_okay=False), help="config.json for the memory estimate"
)
def main(
    profile: str | None,
    overrides: tuple[str, ...],
    params_path: str,
    train_rate: float | None,
    generate_rate: float | None,
    gpu_check: str | None,
    evaluate_rate: float | None,
    model_config: str | None,
) -> None:
    if profile is None and overrides:
        raise click.UsageError("-S needs --profile (the active params.yaml is planned as it is)")
    if profile is None:
        params, source = load_valid(params_path)[0], params_path
    else:
        from stages.profile import compose

        params, source = compose(profile, overrides), f"conf/profile/{profile}.yaml"
        try:  # a composed profile is checked like a params file: one line per bad key, no traceback
            validate(params, source)
        except ParamsError as err:
            raise click.ClickException(str(err)) from None
    rate = throughput(train_rate, generate_rate, gpu_check, evaluate_rate)
    click.echo(format_plan(params, plan(params), rate, source))
    config, config_source = _model_config(params, model_config, active=profile is None)
    click.echo(format_memory(params, config, config_source, gpu_check))


if __name__ == "__main__":
    main()
