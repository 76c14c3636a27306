"""Countdown judge: the answer must use exactly the given numbers and reach the target."""
from __future__ import annotations

from typing import Any

from .arith import ArithError, parse
from .base import ZERO, Reward, answer_line


class CountdownVerifier:
    """reference = {"numbers": [...], "target": int}. Format reward: a parseable `answer:` line."""

    name = "countdown"

    def extract_answer(self, text: str) -> str | None:
        line = answer_line(text)
        if line is None:
            return None
        try:
            return parse(line).canon
        except (ArithError, RecursionError):
            return None

    def score(self, text: str, reference: Any) -> Reward:
        line = answer_line(text)
        if line is None:
            return ZERO
        try:
            node = parse(line)
        except (ArithError, RecursionError) as err:
            return Reward(0.0, 0.0, None, str(err))
        try:
            numbers = tuple(sorted(int(n) for n in reference["numbers"]))
            target = int(reference["target"])
        except (KeyError, TypeError, ValueError):
            return Reward(0.0, 1.0, node.canon, "bad reference")
        if node.numbers != numbers:
            return Reward(0.0, 1.0, node.canon, "numbers do not match")
        if node.value != target:
            return Reward(0.0, 1.0, node.canon, f"value {node.value} != {target}")
        return Reward(1.0, 1.0, node.canon)
