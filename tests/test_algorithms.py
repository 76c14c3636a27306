"""The trainer's pieces that every algorithm shares: reward functions, typed config, the registry."""
from __future__ import annotations

import pytest

from ladi_core.backends import Decoded
from ladi_core.tasks import Question
from training.algos import ALGORITHMS, Algorithm
from training.algos.grpo import GRPOConfig
from training.algos.ladi import LadiConfig
from training.rewards import RewardFn, default_rewards
from training.rl_config import RLConfig
from training.rollout import score


class _Judge:
    name = "judge"

    def score(self, text, reference):
        from ladi_core.verifiers import Reward

        return Reward(float(text == reference), 0.5 if text.startswith("a") else 0.0, answer=text)


def _decoded(*texts):
    return [[Decoded(t, [1] * len(t), 0.0, "stop") for t in texts]]


def test_rewards_are_a_weighted_sum_of_functions_and_each_part_is_reported():
    qs = [Question("q0", "q", "ab")]
    length = RewardFn("length", -0.1, lambda verdict, text, q: len(text))
    s = score(qs, _decoded("ab", "ax", "b"), 3, _Judge(), default_rewards(2.0) + [length])
    # "ab": correct 1 + 2 * format 0.5 - 0.1 * 2; "ax": 0 + 1 - 0.2; "b": 0 + 0 - 0.1
    assert s.rewards.tolist()[0] == pytest.approx([1.8, 0.8, -0.1])
    assert s.components == pytest.approx({"correct": 1 / 3, "format": 2 / 3, "length": -0.5 / 3})
    assert s.answers == [["ab", "ax", "b"]]


def test_the_literal_fields_of_the_config_are_checked():
    with pytest.raises(ValueError, match="algo"):
        RLConfig(algo="ppo")
    with pytest.raises(ValueError, match="loss_norm"):
        RLConfig(algo="grpo", method=GRPOConfig(loss_norm="mean"))
    with pytest.raises(ValueError, match="takes a GRPOConfig"):
        RLConfig(algo="grpo", method=LadiConfig())  # a method's settings are its own
    with pytest.raises(ValueError, match="rollout_backend"):
        RLConfig(rollout_backend="sglang")
    assert not hasattr(RLConfig(), "extra")


def test_every_config_algo_has_a_class_and_every_class_a_config_name():
    from typing import get_args, get_type_hints

    names = set(get_args(get_type_hints(RLConfig)["algo"]))
    assert names == set(ALGORITHMS)
    assert all(issubclass(cls, Algorithm) and cls.name == n for n, cls in ALGORITHMS.items())
