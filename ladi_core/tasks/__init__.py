"""Tasks: dataset + prompt format + verifier."""
from __future__ import annotations

from .base import Question, Task
from .countdown import CountdownConfig, CountdownTask
from .jsonl import JsonlTask


def get_task(spec: str, verifier: str | None = None, **countdown: int) -> Task:
    """`countdown` (optionally with CountdownConfig overrides) or a path to a .jsonl file."""
    if spec == "countdown":
        return CountdownTask(CountdownConfig(**countdown))
    if spec.endswith(".jsonl"):
        if verifier is None:
            raise ValueError("a JSONL task needs --verifier (math or code)")
        return JsonlTask(spec, verifier)
    raise ValueError(f"unknown task {spec!r}: use 'countdown' or a path to a .jsonl file")


__all__ = ["Question", "Task", "CountdownTask", "CountdownConfig", "JsonlTask", "get_task"]
