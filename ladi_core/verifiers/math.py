"""Math judge for user datasets, built on math-verify (LaTeX and plain answers)."""
from __future__ import annotations

import re
from typing import Any

from .base import ZERO, Reward, answer_line

_BOXED = re.compile(r"\\boxed\{")
MAX_ANSWER_CHARS = 500


def _boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} with balanced braces."""
    last = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            last = text[m.end(): i - 1]
    return last


class MathVerifier:
    """Answer taken from the last \\boxed{} or `answer:` line; compared with math-verify."""

    name = "math"

    def extract_answer(self, text: str) -> str | None:
        if not isinstance(text, str):
            return None
        ans = _boxed(text) or answer_line(text)
        if not ans or len(ans) > MAX_ANSWER_CHARS:
            return None
        return ans.strip()

    def score(self, text: str, reference: Any) -> Reward:
        from math_verify import parse, verify  # imported lazily: it is slow to import

        ans = self.extract_answer(text)
        if ans is None:
            return ZERO
        try:
            gold = parse(f"${reference}$" if "$" not in str(reference) else str(reference))
            pred = parse(f"${ans}$")
            ok = bool(pred) and bool(gold) and bool(verify(gold, pred))
        except Exception as err:  # math-verify's parsers raise many types on garbage
            return Reward(0.0, 1.0, ans, f"unparseable: {type(err).__name__}")
        return Reward(1.0 if ok else 0.0, 1.0, ans)
