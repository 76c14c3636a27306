"""Rewards as a list of weighted functions of a verifier's verdict (TRL's reward-function list).

A rollout's reward for one text is sum(weight * fn(verdict, text, question)). The verifier runs
once per text; each reward function reads what it needs from that verdict, so adding a reward
(a length penalty, a format bonus) is one more list entry, not a change to the rollouts.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ladi_core.tasks import Question
from ladi_core.verifiers import Reward


@dataclass(frozen=True)
class RewardFn:
    name: str
    weight: float
    fn: Callable[[Reward, str, Question], float]

    def __call__(self, verdict: Reward, text: str, question: Question) -> float:
        return self.weight * self.fn(verdict, text, question)


def correctness(verdict: Reward, text: str, question: Question) -> float:
    return verdict.correct


def answer_format(verdict: Reward, text: str, question: Question) -> float:
    return verdict.format


def default_rewards(format_weight: float = 0.0) -> list[RewardFn]:
    """Correctness, plus the verifier's format score at `format_weight` (a dual reward when > 0)."""
    return [RewardFn("correct", 1.0, correctness), RewardFn("format", format_weight, answer_format)]
