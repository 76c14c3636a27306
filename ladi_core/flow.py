"""Rectified-flow sampling steps, deterministic (ODE) and stochastic with log-probabilities (SDE).

Convention: z_t = (1 - t) z_0 + t * eps, the model predicts v = eps - z_0, sampling runs t from 1
(noise) down to 0 (data) with dt = t_next - t < 0. The SDE step is Flow-GRPO's: it has the same
marginals as the ODE and a Gaussian transition, so every step has an exact log-density. That
log-density is what RL optimises; re-scoring a stored transition under new parameters gives the
per-step PPO ratio. Everything here is elementwise over any trailing shape.
"""
from __future__ import annotations

import functools
import math
from typing import Literal, get_args

import torch

from . import seeding


@functools.lru_cache(maxsize=64)
def _sigmas(steps: int, shift: float) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    return sched.sigmas.to(torch.float32)


def sigma_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 noise levels from 1 down to 0, from diffusers' flow-matching scheduler (built once
    per setting: building the scheduler costs more than a denoising step)."""
    if steps < 1:
        raise ValueError(f"denoising steps must be >= 1, got {steps}")
    return _sigmas(int(steps), float(shift)).clone()


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + v * (sigma_next - sigma)


def sde_std(sigma: float, sigma_next: float, noise_level: float) -> float:
    """Flow-GRPO's std_t = a * sqrt(t / (1 - t)); at t == 1 the next level stands in."""
    s = sigma_next if sigma >= 1.0 else sigma
    return noise_level * math.sqrt(s / (1.0 - s))


def sde_mean_std(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float,
                 noise_level: float) -> tuple[torch.Tensor, float]:
    """Mean and std of p(x_next | x) for one stochastic step (float32)."""
    dt = sigma_next - sigma
    std_t = sde_std(sigma, sigma_next, noise_level)
    x, v = x.float(), v.float()
    mean = x + (v + std_t**2 / (2.0 * sigma) * (x + (1.0 - sigma) * v)) * dt
    return mean, std_t * math.sqrt(-dt)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Sum of log N(x; mean, std^2) over all but the first (batch) dimension."""
    var = std * std
    lp = -((x.float() - mean) ** 2) / (2 * var) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).sum(-1)


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, noise_level: float,
             generator: torch.Generator | None = None, x_next: torch.Tensor | None = None):
    """One stochastic step. Draws x_next unless given (re-scoring). Returns (x_next, log_prob, mean, std)."""
    mean, std = sde_mean_std(x, v, sigma, sigma_next, noise_level)
    if x_next is None:
        noise = seeding.randn(mean.shape, generator, device=mean.device, dtype=mean.dtype)
        x_next = mean + std * noise
    return x_next, gaussian_log_prob(x_next, mean, std), mean, std


Repulsion = Literal["ladir", "rbf"]  # the kernels `repulsion` has
REPULSION_KERNELS = get_args(Repulsion)


def repulsion(x: torch.Tensor, group_size: int | list[int], kernel: str = "ladir") -> torch.Tensor:
    """Diversity guidance across the plans of one question (consecutive groups of rows).

    g_i = mean_j 2 w_ij (x_i - x_j), r = d_ij^2 / s^2, s = the median pairwise distance in the group.
    kernel "ladir": w = exp(-r)(1 - r), the gradient of sum_j d^2 exp(-d^2/s^2) (LaDiR's): it pushes
    near-duplicate plans apart and draws in those beyond the group's own scale, so it evens the
    spacing more than it widens it. kernel "rbf": w = exp(-r) > 0 (SVGD's repulsive term, particle
    guidance): every pair is pushed apart, nearer pairs harder. The paper sums over j; the mean keeps
    one `diversity` setting meaningful for any M. group_size: one size for all groups, or one per group.
    """
    if kernel not in REPULSION_KERNELS:
        raise ValueError(f"unknown repulsion kernel {kernel!r}: use one of {', '.join(REPULSION_KERNELS)}")
    if isinstance(group_size, int):
        if group_size < 2:
            return torch.zeros_like(x)
        return _repulsion_uniform(x, group_size, kernel)
    out, start = torch.zeros_like(x), 0
    for m in group_size:
        if m >= 2:
            out[start:start + m] = _repulsion_uniform(x[start:start + m], m, kernel)
        start += m
    return out


def _repulsion_uniform(x: torch.Tensor, group_size: int, kernel: str) -> torch.Tensor:
    b = x.shape[0]
    flat = x.float().reshape(b // group_size, group_size, -1)
    diff = flat[:, :, None, :] - flat[:, None, :, :]  # [G, M, M, D]
    d2 = diff.pow(2).sum(-1)
    iu = torch.triu_indices(group_size, group_size, 1)
    s2 = d2[:, iu[0], iu[1]].median(dim=-1).values.clamp_min(1e-8)[:, None, None]
    r = d2 / s2
    w = torch.exp(-r) * (1 - r) if kernel == "ladir" else torch.exp(-r)
    g = (2 * w[..., None] * diff).sum(2) / (group_size - 1)
    return g.reshape(x.shape).to(x.dtype)
