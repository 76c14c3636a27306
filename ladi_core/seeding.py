"""The one seeding rule: the same `seed` gives the same plans and texts through `Reasoner.generate`,
`training.eval`, RL rollouts and the HTTP API, whatever else shares the batch.

A question asked with seed s:
- its M initial plan noises are `randn(M, L, d_z)` from `torch.Generator().manual_seed(s)`;
- plan m's N texts are decoded with seed s + m * N (`row_params`: a row's texts take the seeds after
  the rows before it; vLLM seeds text j of a row with seed + j, the transformers backend draws a
  row's N texts from one generator seeded with its seed);
- a token-level checkpoint is one "plan" of M * N texts.
Several questions asked together with seed s: question i is asked with s + i * QUESTION_STRIDE
(the stride exceeds any question's M * N, so no two questions share a text stream).
An RL step is its questions asked together with the step's seed (`training.rl`); its plans start
from the same noises, and the SDE sampler's per-step noise comes from the rollout's own generator.
No seed derives from which object carries it or where a row sits in a batch.
"""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the backends import this rule: no import back at run time
    from .backends import SamplingParams

QUESTION_STRIDE = 1 << 16  # > plans x samples per plan of any request (the server caps it at 256)


def question_seed(seed: int | None, index: int) -> int | None:
    """The seed of the index-th question of a batch asked with `seed`."""
    return None if seed is None else seed + index * QUESTION_STRIDE


def randn(shape, generator: torch.Generator | None = None, *, device=None, dtype=None) -> torch.Tensor:
    """torch.randn drawn on the generator's own device (the CPU for every generator this project
    makes), then moved to `device`: a seed gives the same numbers on a CPU and on a GPU run, and a
    CPU generator never meets a CUDA tensor (which torch refuses)."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def rand(shape, generator: torch.Generator | None = None, *, device=None) -> torch.Tensor:
    """torch.rand, drawn and moved as `randn` is."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def plan_noise(seed: int | None, plans: int, latent_tokens: int, latent_dim: int) -> torch.Tensor:
    """A question's M initial plan noises (the sampler's x_1)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(plans, latent_tokens, latent_dim, generator=gen)


def row_params(params: SamplingParams, counts: list[int]) -> list[SamplingParams]:
    """One SamplingParams per decoder row when `params` is shared by rows of `counts` texts each:
    row i's texts take the seeds after those of the rows before it, so no two rows share a stream."""
    if params.seed is None:
        return [params] * len(counts)
    starts = itertools.accumulate([0, *counts[:-1]])
    return [replace(params, seed=params.seed + start) for start in starts]

