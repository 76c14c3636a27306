"""Bring-your-own dataset: one JSON object a line, judged by a named verifier.

Fields: `question` (str), `answer` (the verifier's reference), optional `solution` (a reference
completion for SFT; a str or a list of str), optional `id`, optional `split` ("train"/"test";
when absent, a hash of the question decides, so the splits never overlap).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..verifiers import get_verifier
from .base import Question, check_split, in_test_split


class JsonlTask:
    def __init__(self, path: str | Path, verifier: str, test_percent: int = 10):
        self.path = Path(path)
        self.name = f"jsonl:{self.path.name}"
        self.verifier = get_verifier(verifier)
        self._splits: dict[str, list[Question]] = {"train": [], "test": []}
        if not self.path.is_file():
            raise FileNotFoundError(f"dataset not found: {self.path}")
        for lineno, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, reference = row["question"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{self.path}:{lineno}: need a JSON object with 'question' and 'answer' ({err})") \
                    from None
            if not isinstance(prompt, str):
                raise ValueError(f"{self.path}:{lineno}: 'question' must be a string")
            sol = row.get("solution") or ()
            sols = (sol,) if isinstance(sol, str) else tuple(sol)
            split = row.get("split") or ("test" if in_test_split(prompt, test_percent) else "train")
            check_split(split)
            qid = str(row.get("id", f"{self.path.stem}:{lineno}"))
            self._splits[split].append(Question(qid, prompt, reference, sols))

    def questions(self, split: str, n: int, seed: int = 0) -> list[Question]:
        check_split(split)
        pool = self._splits[split]
        if n > len(pool):
            raise ValueError(f"{self.name}: asked for {n} {split} questions, the file has {len(pool)}")
        return random.Random(seed).sample(pool, n)

    def stream(self, split: str, seed: int = 0):
        check_split(split)
        pool = self._splits[split]
        if not pool:
            raise ValueError(f"{self.name}: no {split} questions")
        rng = random.Random(f"stream:{seed}:{split}")
        while True:
            yield rng.choice(pool)

    def sample_solution(self, question: Question, rng: random.Random) -> str:
        if not question.solutions:
            raise ValueError(f"{self.name}: question {question.id} has no 'solution' for supervised training")
        return rng.choice(question.solutions)
