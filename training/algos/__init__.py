"""RL methods, one class each behind `Algorithm` (base.py); the objectives are pure functions of
log-probabilities and advantages beside them. `ALGORITHMS` is what `--algo` chooses from."""
from __future__ import annotations

from .base import Algorithm, Rollout
from .coconut import CoconutGRPO, LatentRL
from .dlr import DLR
from .grpo import GRPO
from .ladi import LadiRL

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (LadiRL, GRPO, DLR, CoconutGRPO, LatentRL)}

__all__ = ["ALGORITHMS", "Algorithm", "Rollout", "GRPO", "LadiRL", "DLR", "CoconutGRPO", "LatentRL"]
