"""Rollouts sampled by vLLM (the `[vllm]` extra) for the dump and evaluate stages: the same `Rollouts` as
`arca.sampling.rollouts.generate`, from the same prompt token ids, with each adapter served as a vLLM LoRA.

Only the sampling moves to vLLM. The credit signals of a dump are still computed by the HF model on the sampled
token ids, so they do not depend on the engine (tests/sampling/test_vllm_rollouts.py). What does differ: vLLM's sampler
draws other random numbers than `model.generate`, so sampled completions (and mean@k) differ between engines
under one seed, and its bf16 kernels may flip a greedy token where two logits tie to rounding. Each request is
seeded (`SamplingParams.seed`), so a rerun gives the same completions on the same GPU and vLLM version.
Untested here: real vLLM needs a GPU; the tests fake the engine at `LLM.generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerBase

from arca.sampling.rollouts import Prompt, Rollouts, assemble, eos_token_ids, prompt_token_ids

# LoRA ranks vLLM accepts as `max_lora_rank` (vllm.config.lora); an adapter needs one >= its rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Share of GPU memory vLLM may take: the dump stage keeps the HF model (and its float32 passes) on the same GPU.
GPU_MEMORY_UTILIZATION = 0.45


def vllm_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds a rank-`rank` adapter."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"rank: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, got {rank}")
    return fits[0]


class VLLMSampler:
    """One vLLM engine over the base model in `model_dir`; `generate` samples with any adapter directory.

    Args:
        model_dir: the base model (HF format, as the base stage writes it). dtype: vLLM's `dtype` (`auto`: the
            checkpoint's). max_rank: the largest adapter rank this engine will serve. seed: the engine's seed
            (requests carry their own). max_model_len: prompt + completion tokens; None: the model's.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str = "auto",
        max_rank: int = 8,
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION,
    ) -> None:
        self.model_dir, self.dtype, self.seed = Path(model_dir), dtype, seed
        self.max_lora_rank = vllm_lora_rank(max_rank)
        self.max_model_len, self.gpu_memory_utilization = max_model_len, gpu_memory_utilization
        self._llm: Any = None
        self._lora_ids: dict[str, int] = {}

    @cached_property
    def generation_config(self) -> GenerationConfig:
        """The base model's generation config (its EOS ids) as `from_pretrained` gives the HF model: its
        generation_config.json, else the one derived from config.json. Read once per engine."""
        try:
            return GenerationConfig.from_pretrained(self.model_dir)
        except OSError:
            return GenerationConfig.from_model_config(AutoConfig.from_pretrained(self.model_dir))

    @property
    def llm(self) -> Any:
        if self._llm is None:  # built on first use: vLLM takes the GPU memory it is given at construction
            from vllm import LLM

            self._llm = LLM(
                model=str(self.model_dir),
                dtype=self.dtype,
                seed=self.seed,
                enable_lora=True,
                max_lora_rank=self.max_lora_rank,
                max_model_len=self.max_model_len,
                gpu_memory_utilization=self.gpu_memory_utilization,
            )
        return self._llm

    def lora_request(self, adapter_dir: Path | None) -> Any:
        """The `LoRARequest` of an adapter directory (one id per directory, so snapshots never share a cache slot);
        None for the base model."""
        if adapter_dir is None:
            return None
        from vllm.lora.request import LoRARequest

        key = str(Path(adapter_dir).resolve())
        lora_id = self._lora_ids.setdefault(key, len(self._lora_ids) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, key)

    def generate(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[Prompt],
        *,
        adapter_dir: Path | None,
        samples: int,
        max_new_tokens: int,
        greedy: bool,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        batch_size: int = 16,
        chat_template_kwargs: dict | None = None,
    ) -> Rollouts:
        """`arca.sampling.rollouts.generate`'s contract (same prompts, same `Rollouts`), sampled by vLLM with the
        adapter at `adapter_dir` (None: the base model). `batch_size` is unused: vLLM schedules its own batches."""
        from vllm import SamplingParams

        del batch_size
        eos_ids = eos_token_ids(self.generation_config, tokenizer)
        ids = prompt_token_ids(tokenizer, prompts, chat_template_kwargs)
        n = 1 if greedy else samples
        # One seed per prompt, from `seed` and its position: completions do not depend on vLLM's batching.
        params = [
            SamplingParams(
                n=n,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0 if greedy else top_k,
                max_tokens=max_new_tokens,
                seed=seed * 1_000_003 + i,
                stop_token_ids=list(eos_ids),
            )
            for i in range(len(ids))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in ids],
            sampling_params=params,
            lora_request=self.lora_request(adapter_dir),
            use_tqdm=False,
        )
        chunks, flat = [], []
        for i, (prompt, output) in enumerate(zip(ids, outputs, strict=True)):
            if len(output.outputs) != n:
                raise RuntimeError(f"vLLM returned {len(output.outputs)} completions for prompt {i}, expected {n}")
            for s, completion in enumerate(output.outputs):
                prompt_ids = torch.tensor([prompt], dtype=torch.long)
                completion_ids = torch.tensor([list(completion.token_ids)], dtype=torch.long).reshape(1, -1)
                chunks.append((prompt_ids, torch.ones_like(prompt_ids), completion_ids))
                flat.append((i, s))
        return assemble(chunks, flat, tokenizer, eos_ids)
