"""The latent-policy contract that generation, RL, the checkpoint loader and the server program
against. Everything the rest of the code relies on is declared here, with its default; a new
kind subclasses `LatentPolicy`, implements `sample` (and `rescore` if RL trains it) and adds its
line to the registry (`register_policy`)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn


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


@dataclass
class Rescored:
    """Stored plans re-scored under a policy's current weights (RL's ratio and reference KL)."""

    log_probs: torch.Tensor  # [rows, steps]: one column per stochastic step (a one-pass policy: one)
    means: list[torch.Tensor]  # per step, each [rows, L, d_z]: the transition's mean
    stds: list[Any]  # per step: the transition's std (a float, or a tensor over d_z)


class LatentPolicy(nn.Module):
    """What proposes latent plans for a question. Class attributes declare what callers may rely on."""

    kind: ClassVar[str]  # the checkpoint's `policy_kind` (the registry's key)
    # the sampler settings a call (an RL rollout, a request) may override: fields of `sampler`
    overrides: ClassVar[frozenset[str]] = frozenset()
    # request parameter -> the sampler setting it sets (validate.py accepts exactly these; any other
    # LaDi sampler parameter in a request is a 400 naming the policy)
    request_fields: ClassVar[Mapping[str, str]] = {}
    # every plan of a question is the same one (a thinker with no randomness): callers ask it for
    # one plan per question and draw their diversity from the decoder's texts
    deterministic: ClassVar[bool] = False
    # thinks with the decoder itself: `bind(decoder, codec)` before sampling (Reasoner does it)
    needs_decoder: ClassVar[bool] = False

    cfg: Any  # architecture dataclass, recorded in ladi.json; has latent_tokens, latent_dim, hidden_size
    sampler: Any  # sampling-defaults dataclass, recorded in ladi.json

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(L, d_z) of one plan: what the codec must agree with."""
        return self.cfg.latent_tokens, self.cfg.latent_dim

    def sample(self, cond: torch.Tensor, cond_mask: torch.Tensor, num_plans: int | list[int], *,
               generator: torch.Generator | None = None, sde: bool = False,
               init_noise: torch.Tensor | None = None, **overrides) -> PlanSample:
        """cond [Q, T, hidden]: the question's prompt embeddings (padded), cond_mask [Q, T] True = real.
        init_noise [rows, L, d_z]: the plans' starting noise (the seeding rule's, `Reasoner.plan_noise`).
        sde=True keeps what `rescore` needs (log_probs, trajectory)."""
        raise NotImplementedError

    def rescore(self, plans: PlanSample, cond: torch.Tensor, cond_mask: torch.Tensor, **overrides) -> Rescored:
        """Log-probabilities of `plans` (drawn with sde=True) under the current weights; cond as
        `sample` took it, one row per question. Only policies that RL trains by ratio need it."""
        raise NotImplementedError(f"the {self.kind} policy has no plan density to re-score")

    def bind(self, decoder: nn.Module, codec: nn.Module) -> None:
        """Hand over the decoder and codec (only `needs_decoder` policies use them)."""

    @property
    def decoder(self) -> nn.Module | None:
        """The decoder `bind` handed over, if this kind keeps one."""
        return None

    def prepare_for_serving(self) -> None:
        """Called once by the server, which samples without gradients in a worker thread beside a
        busy event loop: the place to switch to a faster gradient-free form."""
        self.eval()

    # --- the checks every kind shares ---------------------------------------------------------
    def plan_counts(self, cond: torch.Tensor, num_plans: int | list[int]) -> list[int]:
        """One plan count per question (ValueError for a wrong length or a count below 1)."""
        counts = [num_plans] * cond.shape[0] if isinstance(num_plans, int) else list(num_plans)
        if len(counts) != cond.shape[0] or min(counts, default=0) < 1:
            raise ValueError(f"need one plan count >= 1 per question, got {num_plans}")
        return counts

    def settings(self, base: Any = None, **overrides) -> Any:
        """`base` (default: the policy's sampler) with the given overrides (None = the default);
        a setting this kind does not have is a ValueError naming the ones it has."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - self.overrides
        if unknown:
            has = ", ".join(sorted(self.overrides)) or "none"
            raise ValueError(f"the {self.kind} policy takes no {', '.join(sorted(unknown))} (its settings: {has})")
        return replace(base if base is not None else self.sampler, **given)
