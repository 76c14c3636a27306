"""The latent-policy interface that generation, RL and the server program against."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class PlanSample:
    """M plans for each of Q questions, row q * M + m. With `sde=True` the trajectory and per-step
    log-probabilities are kept (RL re-scores them); plain sampling keeps neither."""

    latents: torch.Tensor  # [Q * M, L, d_z], normalised latent space
    group_size: int | list[int]  # plans per question: one count, or one per question
    log_probs: torch.Tensor | None = None  # [Q * M, steps]
    trajectory: torch.Tensor | None = None  # [steps + 1, Q * M, L, d_z]
    sigmas: torch.Tensor | None = None  # [steps + 1]
    settings: Any = None  # the sampler settings that produced it (the policy's own config type)


class LatentPolicy(Protocol):
    kind: str  # the checkpoint's `policy_kind`
    overrides: frozenset[str]  # the sampler settings a call (an RL rollout, a request) may override
    cfg: Any  # architecture (a dataclass, recorded in ladi.json)
    sampler: Any  # sampling defaults (a dataclass, recorded in ladi.json)

    def sample(self, cond: torch.Tensor, cond_mask: torch.Tensor, num_plans: int | list[int], *,
               generator: torch.Generator | None = None, sde: bool = False,
               init_noise: torch.Tensor | None = None, **overrides) -> PlanSample:
        """cond [Q, T, hidden]: the question's prompt embeddings (padded), cond_mask [Q, T] True = real."""
        ...

    def prepare_for_serving(self) -> None:
        """Called once by the server, which samples without gradients in a worker thread beside a
        busy event loop: the place to switch to a faster gradient-free form."""
        ...
