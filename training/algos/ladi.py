"""LaDi-RL's plan-policy objective: Flow-GRPO on the diffusion sampler's stochastic steps.

One advantage per plan (its decoder-marginalised utility, normalised over the M plans of its
question) is shared by every denoising step of that plan; each step's ratio is clipped
(Flow-GRPO). Optional KL to a frozen reference policy: ||mean - mean_ref||^2 / (2 std^2) per step.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ladi_core.policies import DiffusionPolicy, PlanSample

from .common import clipped_surrogate, group_advantages


def rescore(policy: DiffusionPolicy, plans: PlanSample, cond: torch.Tensor, mask: torch.Tensor,
            **overrides) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """Log-probability of each stored transition under `policy`: [rows, steps], plus means and stds.

    Each transition goes through the sampler's own step (`DiffusionPolicy.step`) with the settings
    that drew the plans (`plans.settings`); `overrides` (guidance, diversity, noise_level) replace them."""
    sc = replace(plans.settings or policy.sampler, **{k: v for k, v in overrides.items() if v is not None})
    logps, means, stds = [], [], []
    sig = plans.sigmas
    ctx = policy.context(cond, mask)  # once per call: every step attends to the same question
    for k in range(len(sig) - 1):
        x = plans.trajectory[k]
        _, lp, mean, std = policy.step(x, float(sig[k]), float(sig[k + 1]), ctx, sc, plans.group_size, sde=True,
                                       x_next=plans.trajectory[k + 1])
        logps.append(lp)
        means.append(mean)
        stds.append(std)
    return torch.stack(logps, 1), means, stds


def ladi_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float,
              kl: torch.Tensor | None = None, kl_beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """logp_*: [plans, steps]; adv: [plans]. Mean over steps and plans."""
    per_step, stats = clipped_surrogate(logp_new, logp_old, adv[:, None], clip)
    loss = per_step.mean()
    if kl is not None and kl_beta:
        loss = loss + kl_beta * kl.mean()
        stats["kl_ref"] = kl.mean().item()
    return loss, stats


def reference_kl(means: list[torch.Tensor], ref_means: list[torch.Tensor], stds: list[float]) -> torch.Tensor:
    """Per plan and step: ||mean - mean_ref||^2 / (2 std^2), summed over latent dims: [plans, steps]."""
    return torch.stack([((m - r) ** 2).flatten(1).sum(-1) / (2 * s * s) for m, r, s in zip(means, ref_means, stds)], 1)


def text_advantages(rewards: torch.Tensor, samples_per_plan: int, groups: str, clip: float | None) -> torch.Tensor:
    """The text policy's advantages. rewards: [questions, plans x texts], texts of a plan consecutive.
    groups="question": normalised over all of a question's texts (a text from a good plan scores
    high); groups="plan": over the texts of its own plan only (the plan's quality is the plan
    policy's business, the decoder is credited only for doing better than that plan's other texts)."""
    if groups == "question":
        return group_advantages(rewards, clip=clip)
    if groups == "plan":
        return group_advantages(rewards.reshape(-1, samples_per_plan), clip=clip).reshape(rewards.shape)
    raise ValueError(f"text advantages are grouped by 'question' or 'plan', not {groups!r}")
