"""Evaluation measures: unbiased pass@k, maj@k, and diversity."""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), in its stable product form."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1 or k > n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_answer(answers: list[str | None]) -> str | None:
    """Most frequent non-empty answer; ties go to the one seen first (a fixed, documented rule)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def maj_at_k(answers: list[str | None], correct: list[bool], k: int) -> float:
    """1 if the majority answer of the first k samples is a correct one."""
    first = answers[:k]
    winner = majority_answer(first)
    return float(any(a == winner and ok for a, ok in zip(first, correct[:k]))) if winner is not None else 0.0


def distinct_correct(answers: list[str | None], correct: list[bool]) -> int:
    return len({a for a, ok in zip(answers, correct) if ok and a is not None})


def mean_pairwise_distance(latents: torch.Tensor) -> float:
    """Mean L2 distance between the M plans [M, ...] of one question."""
    flat = latents.float().flatten(1)
    m = flat.shape[0]
    if m < 2:
        return 0.0
    d = torch.cdist(flat[None], flat[None])[0]
    return float(d.sum() / (m * (m - 1)))
