"""Seeded batched generation for the probe dumps and the evaluation: prompts in (chat messages or raw text, as the
prepare stage writes them), token tensors with SPEC section 1 completion masks out (tokens up to and including
the first EOS).

Prompts are tokenized as TRL's `GRPOTrainer` tokenizes them in training (`prompt_token_ids`): a chat prompt
through the tokenizer's chat template (`add_generation_prompt`, the template's own special tokens), a raw string
as plain text with the tokenizer's default special tokens (a BOS where the tokenizer adds one), no template."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from arca.progress import progress as progress_bar


@dataclass
class Rollouts:
    """N = prompts x samples sequences, prompt left-padded to P tokens, completion right-padded.

    input_ids, attention_mask, completion_mask: (N, P + C); prompt_index, sample: (N,) long.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    prompt_index: Tensor
    sample: Tensor
    prompt_length: int
    texts: list[str]


Prompt = str | Sequence[dict[str, Any]]  # raw text, or chat messages [{"role", "content"}, ...]


def is_chat(prompts: Sequence[Prompt]) -> bool:
    """Whether `prompts` are chat messages (True) or raw strings (False); a mix is an error."""
    kinds = {isinstance(p, str) for p in prompts}
    if len(kinds) > 1:
        raise ValueError("prompts: mixes raw strings and chat messages; prepare writes one prompt.format per table")
    return kinds != {True}


def prompt_texts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], chat_template_kwargs: dict | None = None
) -> tuple[list[str], bool]:
    """(texts to tokenize, add_special_tokens): chat prompts rendered by the chat template (its text already
    holds its special tokens), raw strings as they are (the tokenizer adds its defaults, as TRL does)."""
    if not is_chat(prompts):
        return [str(p) for p in prompts], True
    texts = [
        tokenizer.apply_chat_template(
            [dict(m) for m in p], tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
        )
        for p in prompts
    ]
    return texts, False


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], chat_template_kwargs: dict | None = None
) -> list[list[int]]:
    """The token ids of each prompt, as generation (and TRL's trainer) sees them; for prompt-length checks."""
    texts, special = prompt_texts(tokenizer, prompts, chat_template_kwargs)
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def completion_mask_from_ids(completion_ids: Tensor, eos_token_ids: Sequence[int]) -> Tensor:
    """(N, C) mask: 1 up to and including the first EOS, 0 after (pad may equal EOS, so ids alone can't tell)."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    eos_seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # (N, C)
    return (~eos_seen_before).long()


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    *,
    samples: int,
    max_new_tokens: int,
    greedy: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    chat_template_kwargs: dict | None = None,
    progress: str | None = None,
) -> Rollouts:
    """Generate `samples` completions per prompt (chat messages or raw text), greedy or sampled.

    Sampling is pure by default (top_k=0, top_p=1); `top_p`/`top_k` filter it (the ARCA paper samples its pass@k
    at top-p 0.95). The generator is re-seeded per batch from `seed`, so results do not depend on what ran before.
    `progress`: the label of a progress bar over the sequences (`arca.progress`); None: silent.
    """
    texts, special = prompt_texts(tokenizer, prompts, chat_template_kwargs)
    flat = [(i, s) for i in range(len(texts)) for s in range(samples)]
    eos_ids = eos_token_ids(model.generation_config, tokenizer)
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    chunks = []
    bar = progress_bar(total=len(flat), desc=progress, unit="seq")
    try:
        for start in range(0, len(flat), batch_size):
            batch = flat[start : start + batch_size]
            enc = tokenizer([texts[i] for i, _ in batch], return_tensors="pt", padding=True, add_special_tokens=special)
            enc = enc.to(model.device)
            torch.manual_seed(seed * 1_000_003 + start)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    do_sample=not greedy,
                    temperature=temperature if not greedy else None,
                    top_k=top_k if not greedy else None,
                    top_p=top_p if not greedy else None,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos_ids,
                )
            chunks.append((enc["input_ids"], enc["attention_mask"], out[:, enc["input_ids"].shape[1] :]))
            bar.update(len(batch))
    finally:
        bar.close()
        tokenizer.padding_side = old_side
        model.train(was_training)
    return assemble(chunks, flat, tokenizer, eos_ids)


def eos_token_ids(generation_config: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a completion: the generation config's EOS ids (Qwen3 chat: `<|im_end|>` and
    `<|endoftext|>`) plus the tokenizer's own."""
    ids = generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def assemble(
    chunks: Sequence[tuple[Tensor, Tensor, Tensor]],
    flat: Sequence[tuple[int, int]],
    tokenizer: PreTrainedTokenizerBase,
    eos_ids: Sequence[int],
) -> Rollouts:
    """`Rollouts` from generated batches, padded to one common prompt width P (left) and completion width C (right).

    Args:
        chunks: per batch, (prompt ids (n, p) left-padded, prompt attention mask (n, p), completion ids (n, c)).
        flat: (prompt index, sample) of every sequence, in the order of the chunks' rows.
        eos_ids: the ids that end a completion (`eos_token_ids`).
    """
    pad = tokenizer.pad_token_id
    width_p = max(p.shape[1] for p, _, _ in chunks)
    width_c = max(c.shape[1] for _, _, c in chunks)
    ids, attn, cmask = [], [], []
    for prompt_ids, prompt_attn, comp in chunks:
        n = prompt_ids.shape[0]
        lp, lc = width_p - prompt_ids.shape[1], width_c - comp.shape[1]
        prompt_ids = torch.cat([torch.full((n, lp), pad, dtype=torch.long), prompt_ids.cpu()], dim=1)
        prompt_attn = torch.cat([torch.zeros(n, lp, dtype=torch.long), prompt_attn.cpu()], dim=1)
        comp = torch.cat([comp.cpu(), torch.full((n, lc), pad, dtype=torch.long)], dim=1)
        mask_c = completion_mask_from_ids(comp, eos_ids)
        mask_c[:, comp.shape[1] - lc :] = 0
        ids.append(torch.cat([prompt_ids, comp], dim=1))
        attn.append(torch.cat([prompt_attn, mask_c], dim=1))
        cmask.append(torch.cat([torch.zeros_like(prompt_attn), mask_c], dim=1))
    input_ids = torch.cat(ids)
    completion_mask = torch.cat(cmask)
    texts = [
        tokenizer.decode(row[width_p:][m[width_p:].bool()], skip_special_tokens=True)
        for row, m in zip(input_ids, completion_mask)
    ]
    return Rollouts(
        input_ids=input_ids,
        attention_mask=torch.cat(attn),
        completion_mask=completion_mask,
        prompt_index=torch.tensor([i for i, _ in flat]),
        sample=torch.tensor([s for _, s in flat]),
        prompt_length=width_p,
        texts=texts,
    )
