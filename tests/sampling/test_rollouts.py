import pytest
import torch

from arca.sampling.rollouts import completion_mask_from_ids, generate, is_chat, prompt_token_ids
from tests.tiny import tiny_model, tiny_tokenizer

PROMPTS = [[{"role": "user", "content": "1+1"}], [{"role": "user", "content": "what is 22 + 3?"}]]


def test_completion_mask_stops_after_first_eos_even_when_pad_is_eos():
    ids = torch.tensor([[5, 6, 3, 3, 3], [5, 3, 7, 3, 3], [5, 6, 7, 8, 9]])
    mask = completion_mask_from_ids(ids, [3])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_generate_shapes_masks_and_determinism():
    model, tok = tiny_model(), tiny_tokenizer()
    kwargs = {"samples": 3, "max_new_tokens": 6, "greedy": False, "seed": 7, "batch_size": 4}
    a = generate(model, tok, PROMPTS, **kwargs)
    b = generate(model, tok, PROMPTS, **kwargs)
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.input_ids.shape[0] == 6 and a.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert a.sample.tolist() == [0, 1, 2, 0, 1, 2]
    p = a.prompt_length
    assert a.completion_mask[:, :p].sum() == 0
    # completion positions are attended to exactly where the completion mask says they are valid
    assert torch.equal(a.attention_mask[:, p:], a.completion_mask[:, p:])
    # the prompt itself is left-padded: its last position is always real
    assert a.attention_mask[:, p - 1].all()
    other = generate(model, tok, PROMPTS, **{**kwargs, "seed": 8})
    assert not torch.equal(a.input_ids, other.input_ids)


def test_greedy_ignores_seed_and_batching():
    model, tok = tiny_model(), tiny_tokenizer()
    a = generate(model, tok, PROMPTS, samples=1, max_new_tokens=5, greedy=True, seed=1, batch_size=1)
    b = generate(model, tok, PROMPTS, samples=1, max_new_tokens=5, greedy=True, seed=2, batch_size=2)
    assert a.texts == b.texts


RAW_PROMPTS = ["Solve: 1+1\n", "Problem: what is 22 + 3?\n"]


def test_raw_prompts_generate_as_plain_text():
    model, tok = tiny_model(), tiny_tokenizer()
    out = generate(model, tok, RAW_PROMPTS, samples=2, max_new_tokens=4, greedy=False, seed=3, batch_size=4)
    assert out.input_ids.shape[0] == 4 and out.prompt_index.tolist() == [0, 0, 1, 1]
    longest = max(len(ids) for ids in prompt_token_ids(tok, RAW_PROMPTS))
    assert out.prompt_length == longest  # no chat template around the text
    assert "<|im_start|>" not in tok.decode(out.input_ids[0, : out.prompt_length])


def test_prompt_token_ids_match_trl_tokenization():
    """What generation (and the prompt-length check) counts is what TRL's trainer feeds the model."""
    tok = tiny_tokenizer()
    assert prompt_token_ids(tok, RAW_PROMPTS) == tok(text=RAW_PROMPTS)["input_ids"]  # TRL, non-conversational
    chat = tok.apply_chat_template(PROMPTS, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt_token_ids(tok, PROMPTS) == [list(ids) for ids in chat["input_ids"]]
    assert is_chat(PROMPTS) and not is_chat(RAW_PROMPTS)
    with pytest.raises(ValueError, match="mixes raw strings and chat messages"):
        is_chat([RAW_PROMPTS[0], PROMPTS[0]])


def test_top_p_and_top_k_filter_sampling():
    """A vanishing nucleus (or k = 1) leaves only the most likely token: sampling becomes greedy."""
    model, tok = tiny_model(), tiny_tokenizer()
    greedy = generate(model, tok, PROMPTS, samples=1, max_new_tokens=5, greedy=True)
    for kwargs in ({"top_p": 1e-6}, {"top_k": 1}):
        sampled = generate(model, tok, PROMPTS, samples=1, max_new_tokens=5, greedy=False, seed=5, **kwargs)
        assert sampled.texts == greedy.texts, kwargs
    pure = generate(model, tok, PROMPTS, samples=3, max_new_tokens=5, greedy=False, seed=5)
    assert any(t != greedy.texts[i] for i, t in zip(pure.prompt_index.tolist(), pure.texts))
