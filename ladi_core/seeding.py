"""The one seeding rule: the same `seed` gives the same plans and texts through `Reasoner.generate`,
`training.eval`, RL rollouts' texts and the HTTP API, whatever else shares the batch.

A question asked with seed s:
- its M initial plan noises are `randn(M, L, d_z)` from `torch.Generator().manual_seed(s)`;
- plan m's N texts are decoded with their own SamplingParams, seed s + m * N (vLLM seeds text j
  with seed + j; the transformers backend draws a prefix's N texts from one generator);
- a token-level checkpoint is one "plan" of M * N texts.
Several questions asked together with seed s: question i is asked with s + i * QUESTION_STRIDE
(the stride exceeds any question's M * N, so no two questions share a text stream).
RL rollouts sample plans with the stochastic sampler (its own generator) and decode texts by this rule.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .backends import SamplingParams

QUESTION_STRIDE = 1 << 16  # > plans x samples per plan of any request (the server caps it at 256)


def question_seed(seed: int | None, index: int) -> int | None:
    """The seed of the index-th question of a batch asked with `seed`."""
    return None if seed is None else seed + index * QUESTION_STRIDE


def plan_noise(seed: int | None, plans: int, latent_tokens: int, latent_dim: int) -> torch.Tensor:
    """A question's M initial plan noises (the sampler's x_1)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(plans, latent_tokens, latent_dim, generator=gen)


def plan_params(params: SamplingParams, seed: int | None, plans: int, samples_per_plan: int) -> list[SamplingParams]:
    """One SamplingParams per plan of a question asked with `seed` (distinct objects: each plan's
    texts have streams of their own, which no batch-mate changes)."""
    return [replace(params, seed=None if seed is None else seed + m * samples_per_plan) for m in range(plans)]
