"""Group advantages and the clipped surrogate every algorithm here shares."""
from __future__ import annotations

import torch


def group_advantages(values: torch.Tensor, eps: float = 1e-6, clip: float | None = None) -> torch.Tensor:
    """(v - mean) / (std + eps) within each group (last dim); std is the population std.
    A group whose members are all equal gets zero advantage: it carries no preference."""
    mean = values.mean(-1, keepdim=True)
    std = values.std(-1, unbiased=False, keepdim=True)
    adv = (values - mean) / (std + eps)
    return adv.clamp(-clip, clip) if clip is not None else adv


def clipped_surrogate(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor,
                      clip: float) -> tuple[torch.Tensor, dict]:
    """PPO's per-element loss -min(r A, clip(r, 1-c, 1+c) A), r = exp(logp_new - logp_old).
    Shapes broadcast (adv per sequence/plan against per-token/per-step log-probs). Returns the
    elementwise loss and statistics (clip fraction, approximate KL)."""
    log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip, 1 + clip) * adv
    loss = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        clip_frac = ((ratio - 1).abs() > clip).float().mean().item()
        approx_kl = ((ratio - 1) - log_ratio).mean().item()  # k3 of the ratio, >= 0
    return loss, {"clip_frac": clip_frac, "approx_kl": approx_kl}
