import torch

from arca.rollouts import completion_mask_from_ids, generate
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
