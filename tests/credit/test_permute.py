"""The permutation control (SPEC 3 `permute`): `arca.credit.normalize.permute_weights` keeps each row's weights and its
padding, is seeded by the run seed, the step and the row, and is uniform over the valid positions."""

from __future__ import annotations

import math
from itertools import permutations

import pytest
import torch

from arca.credit.normalize import normalize, permutation_seeds, permute_weights

WEIGHTS = torch.tensor([[0.5, 1.0, 2.5, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0, 0.0], [0.2, 0.4, 0.6, 1.3, 2.5]])
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def test_each_row_keeps_its_weights_and_its_padding():
    out = permute_weights(WEIGHTS, MASK, torch.tensor([1, 2, 3]))
    for row in range(3):
        valid = MASK[row].bool()
        assert torch.equal(out[row, valid].sort().values, WEIGHTS[row, valid].sort().values)  # the same multiset
        assert torch.all(out[row, ~valid] == 0)
    garbage = torch.where(MASK.bool(), WEIGHTS, torch.tensor(7.0))  # padding values are never read
    assert torch.equal(permute_weights(garbage, MASK, torch.tensor([1, 2, 3])), out)
    assert out.dtype == torch.float32


def test_non_prefix_masks_permute_only_the_valid_tokens():
    mask = torch.tensor([[0, 1, 0, 1, 1, 0]])
    weights = torch.tensor([[9.0, 1.0, 9.0, 2.0, 3.0, 9.0]])
    seen = {tuple(permute_weights(weights, mask, torch.tensor([s]))[0].tolist()) for s in range(60)}
    assert all(p[0] == p[2] == p[5] == 0 for p in seen) and len(seen) == 6  # every order of 1, 2, 3 reached


def test_seeded_by_seed_step_and_row():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [5, 6, 7, 4, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    seeds = permutation_seeds(0, 3, ids, mask)
    assert seeds.dtype == torch.int64 and bool((seeds >= 0).all())
    assert torch.equal(seeds, permutation_seeds(0, 3, ids, mask))  # deterministic
    assert len(set(seeds.tolist())) == 3  # rows differ in their valid tokens (row 0 and 1: in length)
    # Only the valid tokens count: padding content does not change a row's seed.
    assert torch.equal(permutation_seeds(0, 3, ids.masked_fill(mask == 0, 0), mask), seeds)
    other_step, other_seed = permutation_seeds(0, 4, ids, mask), permutation_seeds(1, 3, ids, mask)
    assert not set(other_step.tolist()) & set(seeds.tolist()) and not set(other_seed.tolist()) & set(seeds.tolist())
    weights = torch.arange(1, 41, dtype=torch.float32).reshape(2, 20)  # 20! orders: a collision would be a bug
    rows = torch.ones(2, 20)
    same = permute_weights(weights, rows, permutation_seeds(0, 3, ids[:2], mask[:2]))
    assert torch.equal(same, permute_weights(weights, rows, permutation_seeds(0, 3, ids[:2], mask[:2])))
    later = permute_weights(weights, rows, permutation_seeds(0, 4, ids[:2], mask[:2]))
    assert not torch.equal(same[0], later[0]) and not torch.equal(same[1], later[1])


def test_uniform_over_positions():
    """Every one of the 4! orders of a 4-token row comes up equally often (chi-square over 2,400 seeds), and
    each weight lands on each position a quarter of the time."""
    weights, mask = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0]]), torch.tensor([[1, 1, 1, 1, 0]])
    draws = 2400
    out = permute_weights(weights.expand(draws, 5), mask.expand(draws, 5), torch.arange(draws) * 7919 + 11)
    orders = list(permutations([1.0, 2.0, 3.0, 4.0]))
    counts = torch.tensor([sum(tuple(r[:4].tolist()) == o for r in out) for o in orders], dtype=torch.float64)
    expected = draws / len(orders)  # 100 each
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60.0, chi2  # 23 degrees of freedom: P(chi2 > 60) < 1e-4 when uniform
    assert torch.all(out[:, 4] == 0)
    per_position = torch.stack([(out[:, :4] == v).float().mean(0) for v in (1.0, 2.0, 3.0, 4.0)])  # (4, 4)
    assert torch.allclose(per_position, torch.full((4, 4), 0.25), atol=0.04)


def test_after_normalization_the_concentration_is_kept():
    a = torch.tensor([[0.1, 5.0, 0.3, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    w, _ = normalize(a + 0.01, mask, "mean", w_max=3.0)
    out = permute_weights(w, mask, permutation_seeds(0, 0, torch.arange(6)[None], mask))
    assert math.isclose(float(out.sum()), 5.0, rel_tol=1e-6) and float(out.max()) <= 3.0 + 1e-6
    assert torch.equal(out.sort(dim=1).values, w.sort(dim=1).values)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^seeds: expected one per row \(3\), got 2"):
        permute_weights(WEIGHTS, MASK, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"^weights: must be finite and >= 0"):
        permute_weights(-WEIGHTS, MASK, torch.tensor([1, 2, 3]))
