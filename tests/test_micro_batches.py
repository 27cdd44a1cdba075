"""How a step's sequences are cut into micro-batches: by count in rollout order (the default), or by a token
budget over length-sorted sequences; every sequence exactly once, the budget respected, and FSDP ranks
equalised to the same number of forwards."""

from __future__ import annotations

import numpy as np
import pytest

from student_trainer.train import micro_batch_groups, split_to


def test_by_count_is_rollout_order():
    groups = micro_batch_groups(np.array([5, 9, 3, 7, 2]), 2, None)
    assert [g.tolist() for g in groups] == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("seed", range(5))
def test_token_budget_packs_sorted_lengths_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, 400, size=int(rng.integers(1, 60)))
    budget, cap = 1000, 8
    groups = micro_batch_groups(lengths, cap, budget)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    for g in groups:
        assert len(g) <= cap
        assert len(g) == 1 or len(g) * lengths[g].max() <= budget
    flat = np.concatenate(groups)
    assert (np.diff(lengths[flat]) <= 0).all(), "longest first"


def test_a_sequence_over_the_budget_goes_alone():
    groups = micro_batch_groups(np.array([50, 2000, 40]), 16, 100)
    assert [g.tolist() for g in groups] == [[1], [0, 2]]  # 2 x 50 = 100 fits


def test_split_to_equalises_forward_counts():
    groups = micro_batch_groups(np.array([9, 8, 7, 6, 5, 4]), 6, None)
    assert len(groups) == 1
    out = split_to(groups, 4)
    assert len(out) == 4 and sorted(np.concatenate(out).tolist()) == list(range(6))
    with pytest.raises(ValueError):
        split_to([np.array([0])], 2)
