"""Stage `evaluate@<run>` / `evaluate_base`: held-out accuracy (pass@1 greedy; mean@k and pass@k over k samples)
of one run's final adapter, or of the base model, graded by math-verify and by the paper's `exact` grader.

    python -m stages.evaluate --run arca-r8-s0                    # a trained run (= --method arca --rank 8 --seed 0)
    python -m stages.evaluate --base                              # the base model

Params `evaluate`: k, max_new_tokens, batch_size, temperature, seed, primary, `top_p` / `top_k` (null:
unfiltered sampling; the paper samples its pass@4 at temperature 1.0 and top-p 0.95), and `engine`: `hf`
(`model.generate`) or `vllm` (arca.sampling.vllm: the adapter served as a vLLM LoRA; other random draws than
HF's, so sampled numbers differ between engines under one seed). The JSON keeps its
fields (`pass@1`, `mean@<k>`, `n` per set) and adds `pass_at_k` and the `exact_` ones (see arca.sampling.evaluation).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import click

from stages.common import check_engine, load_valid, parse_run_id, run_id, section

OUT = Path("data/eval")


def _number(value: object) -> float | None:
    """A params number (YAML may read `1e-3` as a string), or None when it is not one."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def sampling(block: dict) -> dict:
    """`temperature`, `top_p`, `top_k` of the k samples, validated; null top_p / top_k leave sampling unfiltered."""
    temperature = _number(block.get("temperature", 1.0))
    if temperature is None or temperature <= 0:
        raise ValueError(f"params.yaml: evaluate.temperature must be > 0, got {block.get('temperature')!r}")
    top_p = 1.0 if block.get("top_p") is None else _number(block["top_p"])
    if top_p is None or not 0 < top_p <= 1:
        raise ValueError(f"params.yaml: evaluate.top_p must be null or in (0, 1], got {block.get('top_p')!r}")
    top_k = block.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"params.yaml: evaluate.top_k must be null or an int >= 0, got {top_k!r}")
    return {"temperature": temperature, "top_p": top_p, "top_k": 0 if top_k is None else top_k}


def check(block: dict) -> None:
    for key in ("k", "max_new_tokens", "batch_size"):
        value = block.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "k" else 1):
            raise ValueError(
                f"params.yaml: evaluate.{key} must be a {'non-negative' if key == 'k' else 'positive'} "
                f"int, got {value!r}"
            )
    sampling(block)


@click.command()
@click.option("--run", "run", default=None, help="run id, a key of study.runs (or give --method, --rank, --seed)")
@click.option("--method", help="the run's method label (arca, arca_perm, ...)")
@click.option("--rank", type=int)
@click.option("--seed", type=int)
@click.option("--base", "is_base", is_flag=True, help="evaluate the base model (no adapter)")
@click.option("--params", "params_path", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
def main(
    run: str | None, method: str | None, rank: int | None, seed: int | None, is_base: bool, params_path: str
) -> None:
    params = load_valid(params_path)[0]  # the whole file first: ~1 s, before torch loads
    block, model_params = section(params, "evaluate"), section(params, "model")
    try:  # a params error is one line and a non-zero exit, never a traceback
        check(block)
        engine = check_engine(params, "evaluate")
        if block.get("primary") not in (None, *section(section(params, "data"), "eval")):
            primary = block["primary"]
            raise ValueError(f"params.yaml: evaluate.primary must name one of data.eval's sets, got {primary!r}")
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if run is not None and not is_base:
        method, rank, seed = parse_run_id(run)  # the schema keeps every run id <method>-r<rank>-s<seed>
    if not is_base and None in (method, rank, seed):
        raise click.UsageError("give --run, or --method, --rank and --seed, or --base")
    run = "base" if is_base else run_id(method, rank, seed)
    adapter = None if is_base else Path("data/runs") / run / "adapter"
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: no trained adapter; run `dvc repro train` first")
    import pandas as pd  # heavy imports (torch, transformers) only after validation
    from transformers import AutoTokenizer

    from arca.io import write_json, write_parquet
    from arca.sampling.evaluation import evaluate, summarize
    from stages.runs import BASE_DIR, load_base_model, vllm_sampler, with_adapter

    problems = pd.read_parquet("data/prepared/eval.parquet")
    dtype = model_params.get("dtype", "auto")
    if engine == "vllm":  # vLLM samples with the adapter itself: no HF model on the GPU
        model, tokenizer = None, AutoTokenizer.from_pretrained(BASE_DIR)
        sampler = vllm_sampler(dtype, max_rank=rank or 1, seed=int(block.get("seed", 0)))
        sample = partial(sampler.generate, tokenizer, adapter_dir=adapter)
    else:
        model, tokenizer = load_base_model(dtype)
        model, sample = model if adapter is None else with_adapter(model, adapter), None
    per_problem = evaluate(
        model,
        tokenizer,
        problems,
        k=block["k"],
        max_new_tokens=block["max_new_tokens"],
        **sampling(block),
        seed=int(block.get("seed", 0)),
        batch_size=block["batch_size"],
        chat_template_kwargs=model_params.get("chat_template_kwargs"),
        sample=sample,
        progress=f"evaluate {run}",
    )
    summary = {
        "run": run,
        "method": "base" if is_base else method,
        "rank": 0 if is_base else rank,
        "seed": -1 if is_base else seed,
        "k": block["k"],
        "engine": engine,
        "sets": summarize(per_problem, block["k"]),
    }
    primary = block.get("primary")
    if primary in summary["sets"]:  # the headline numbers (figures mark them on the training curves)
        summary.update({"primary": primary, **{k: v for k, v in summary["sets"][primary].items() if k != "n"}})
    write_parquet(OUT / f"{run}.parquet", per_problem)
    write_json(OUT / f"{run}.json", summary)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
