"""Countdown judge: the answer must reach the target using the given numbers, each exactly once
(or, with `use_all: false` in the reference, at least two of them, each at most once)."""
from __future__ import annotations

from collections import Counter
from typing import Any

from .arith import ArithError, parse
from .base import ZERO, Reward, answer_line


class CountdownVerifier:
    """reference = {"numbers": [...], "target": int, "use_all": bool (default true)}.
    Format reward: a parseable `answer:` line."""

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
            use_all = reference.get("use_all", True)
            if not isinstance(use_all, bool):
                raise TypeError("use_all must be a boolean")
        except (KeyError, TypeError, ValueError, AttributeError):
            return Reward(0.0, 1.0, node.canon, "bad reference")
        if use_all and node.numbers != numbers:
            return Reward(0.0, 1.0, node.canon, "numbers do not match")
        if not use_all and (len(node.numbers) < 2 or not _sub_multiset(node.numbers, numbers)):
            return Reward(0.0, 1.0, node.canon, "numbers are not two or more of the given ones")
        if node.value != target:
            return Reward(0.0, 1.0, node.canon, f"value {node.value} != {target}")
        return Reward(1.0, 1.0, node.canon)


def _sub_multiset(used: tuple[int, ...], given: tuple[int, ...]) -> bool:
    return not (Counter(used) - Counter(given))
