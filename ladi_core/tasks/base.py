"""A Task is a dataset, a prompt format and a verifier: everything training and serving need to
know about a kind of problem. Splits are fixed by a hash of the question, so the train and test
sets can never overlap, however many questions either side draws."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..verifiers import Verifier


@dataclass(frozen=True)
class Question:
    id: str
    prompt: str  # the user message; the checkpoint's chat template wraps it
    reference: Any  # what the verifier compares against
    solutions: tuple[str, ...] = field(default=())  # reference completions (for SFT), may be empty


class Task(Protocol):
    name: str
    verifier: Verifier

    def questions(self, split: str, n: int, seed: int = 0) -> list[Question]:
        """n distinct questions of `split` ("train" or "test"), the same for the same seed."""
        ...


def in_test_split(key: str, test_percent: int) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < test_percent


def check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
