"""vLLM check for the dump and evaluate stages' `engine: vllm`: the same adapter sampled by HF `generate` and by
`arca.sampling.vllm.VLLMSampler`, side by side in one run, on random weights (nothing is downloaded).

    python -m bench.vllm_check [--prompts 32] [--tokens 256] [--json out.json]    # a CUDA GPU and vLLM
    python -m bench.vllm_check --tiny       # the same code on the CPU (the tests run it with vLLM faked)

Qwen3-1.7B's architecture in bf16 with random weights and a rank-64 LoRA (B ~ N(0, 0.02^2)) saved as the base
stage and the train stage save them, raw-text prompts of random words. The last line gives, for greedy decoding,
the share of completions identical under both engines and the mean shared-prefix fraction (bf16 kernels differ,
and random weights have small logit gaps, so this is a floor for a trained model), and the generated tokens per
second of each engine for greedy and for 4 samples per prompt (the second call of each, after a warm-up).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from arca.sampling.rollouts import Rollouts, generate
from arca.sampling.vllm import VLLMSampler
from bench.gpu_check import FULL, TINY, Size, build_model
from bench.step_overhead import word_tokenizer

RANK = 64


def save_base_and_adapter(size: Size, workdir: Path, device: torch.device) -> tuple[Path, Path]:
    model = build_model(size, device)
    tokenizer = word_tokenizer(size.vocab)
    model.save_pretrained(workdir / "base")
    tokenizer.save_pretrained(workdir / "base")
    lora = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            param.data = (torch.randn(param.shape, generator=generator) * 0.02).to(param)
    lora.save_pretrained(workdir / "adapter")
    del lora, model
    return workdir / "base", workdir / "adapter"


def prompts(size: Size, n: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(8, size.vocab - 4, (n, size.prompt_words), generator=generator)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def completions(rollouts: Rollouts) -> list[list[int]]:
    rows = rollouts.input_ids[:, rollouts.prompt_length :]
    mask = rollouts.completion_mask[:, rollouts.prompt_length :].bool()
    return [row[m].tolist() for row, m in zip(rows, mask)]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of identical completions, mean fraction of the longer completion both share as a prefix)."""
    shared = []
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        shared.append(n / max(len(x), len(y), 1))
    return sum(x == y for x, y in zip(a, b)) / len(a), sum(shared) / len(shared)


def timed(fn, **kwargs: Any) -> tuple[Rollouts, float]:
    fn(**kwargs)  # warm-up: CUDA graphs, kernels, the LoRA load
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(**kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run(size: Size, n_prompts: int, tokens: int, device: torch.device) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = save_base_and_adapter(size, Path(tmp), device)
        tokenizer, texts = word_tokenizer(size.vocab), prompts(size, n_prompts)
        model = build_model(size, device)
        hf_model = PeftModel.from_pretrained(model, adapter).eval()
        sampler = VLLMSampler(base, dtype="bfloat16", max_rank=RANK, seed=0)
        common = {"prompts": texts, "max_new_tokens": tokens, "batch_size": n_prompts}
        hf_kwargs = {"model": hf_model, "tokenizer": tokenizer, **common}
        vllm_kwargs = {"tokenizer": tokenizer, "adapter_dir": adapter, **common}
        result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU"}
        for mode, extra in (("greedy", {"samples": 1, "greedy": True}), ("k4", {"samples": 4, "greedy": False})):
            hf, hf_s = timed(generate, **hf_kwargs, **extra)
            ours, vllm_s = timed(sampler.generate, **vllm_kwargs, **extra)
            hf_tokens, vllm_tokens = int(hf.completion_mask.sum()), int(ours.completion_mask.sum())
            result[mode] = {"hf_tokens_per_s": hf_tokens / hf_s, "vllm_tokens_per_s": vllm_tokens / vllm_s}
            if mode == "greedy":
                same, prefix = agreement(completions(hf), completions(ours))
                result[mode].update(identical=same, shared_prefix=prefix)
        return {"model": size.name, "prompts": n_prompts, "tokens": tokens, "rank": RANK, **result}


def final_line(r: dict[str, Any]) -> str:
    speed = " | ".join(
        f"{mode} tokens/s: HF {r[mode]['hf_tokens_per_s']:,.0f}, vLLM {r[mode]['vllm_tokens_per_s']:,.0f} "
        f"({r[mode]['vllm_tokens_per_s'] / r[mode]['hf_tokens_per_s']:.1f}x)"
        for mode in ("greedy", "k4")
    )
    return (
        f"vllm_check: {r['device']}, {r['model']} bf16 random, r{r['rank']}, {r['prompts']} prompts x {r['tokens']} "
        f"tokens | greedy identical completions {r['greedy']['identical']:.2f}, shared prefix "
        f"{r['greedy']['shared_prefix']:.2f} | {speed}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen3 on the CPU")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256, help="max new tokens per completion")
    parser.add_argument("--json", type=Path, default=None)
    options = parser.parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        print("vllm_check: skipped, vllm is not installed (pip install '.[vllm]')")
        return
    if not options.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: vLLM needs a GPU (use --tiny to rehearse the code path)")
    size = TINY if options.tiny else FULL
    device = torch.device("cpu" if options.tiny else "cuda")
    result = run(size, options.prompts, options.tokens, device)
    if options.json:
        options.json.write_text(json.dumps(result, indent=2) + "\n")
    print(final_line(result))


if __name__ == "__main__":
    main()
