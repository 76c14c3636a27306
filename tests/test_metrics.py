from math import comb

import pytest
import torch

from ladi_core.metrics import distinct_correct, maj_at_k, majority_answer, mean_pairwise_distance, pass_at_k


@pytest.mark.parametrize("n,c,k", [(10, 0, 1), (10, 3, 1), (10, 3, 5), (64, 7, 16), (5, 5, 2), (20, 19, 2)])
def test_pass_at_k_matches_the_combinatorial_definition(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(8, 2, 1) == pytest.approx(0.25)


def test_pass_at_k_rejects_nonsense():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority():
    assert majority_answer(["a", "b", "b", None, "a"]) == "a"  # tie: first seen wins
    assert majority_answer([None, None]) is None
    assert maj_at_k(["x", "y", "y"], [False, True, True], 3) == 1.0
    assert maj_at_k(["x", "x", "y"], [False, False, True], 3) == 0.0
    assert distinct_correct(["a", "a", "b", "c"], [True, True, True, False]) == 2


def test_mean_pairwise_distance():
    z = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert mean_pairwise_distance(z) == pytest.approx(5.0)
    assert mean_pairwise_distance(z[:1]) == 0.0
