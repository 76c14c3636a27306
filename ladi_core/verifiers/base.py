"""The verifier interface: every task's judge returns a reward in [0, 1] and never raises on bad
text or references (the code judge raises `SandboxUnavailable` where it has no sandbox to run in)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Reward:
    """Correctness and format are kept apart so RL can weight them separately."""

    correct: float
    format: float
    answer: str | None = None  # canonical extracted answer: majority votes and distinct-solution counts
    detail: str = ""

    @property
    def solved(self) -> bool:
        """The one definition of a correct text (pass@k, maj@k, verified choices, RL's `correct`):
        full credit. `correct` itself stays a reward, which a verifier may make partial."""
        return self.correct >= 1.0


ZERO = Reward(0.0, 0.0)


class Verifier(Protocol):
    name: str

    def score(self, text: str, reference: Any) -> Reward: ...

    def extract_answer(self, text: str) -> str | None:
        """Canonical final answer of `text` (None when there is none); what maj@k votes over."""
        ...


def answer_line(text: str, marker: str = "answer:") -> str | None:
    """The text after the last `marker` on its line, or None. Shared by the line-answer tasks."""
    if not isinstance(text, str):
        return None
    idx = text.rfind(marker)
    if idx < 0:
        return None
    rest = text[idx + len(marker):]
    return rest.split("\n", 1)[0].strip()
