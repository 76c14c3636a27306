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
    adv = adv.to(logp_new.device)  # rewards are scored on the CPU
    log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip, 1 + clip) * adv
    loss = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        clip_frac = ((ratio - 1).abs() > clip).float().mean().item()
        approx_kl = ((ratio - 1) - log_ratio).mean().item()  # k3 of the ratio, >= 0
    return loss, {"clip_frac": clip_frac, "approx_kl": approx_kl}


def pass_at_k_advantages(correct: torch.Tensor, k: int) -> torch.Tensor:
    """The closed-form pass@k advantage (arXiv 2508.10751) of each of a group's n texts (last dim),
    from their 0/1 correctness: with c correct, rho = 1 - C(n-c, k) / C(n, k) is the group's pass@k
    and sigma = sqrt(rho (1 - rho)); a correct text gets (1 - rho) / sigma, a wrong one
    (1 - rho - C(n-c-1, k-1) / C(n-1, k-1)) / sigma. A wrong text is penalised only by how much it
    lowers the chance that a draw of k contains a correct one, so once a group solves the question
    at k, its wrong answers stop being pushed away (exploration is kept). sigma = 0 gives 0."""
    n = correct.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"pass@k advantages need 1 <= k <= the group size {n}, got k = {k}")
    c = correct.float().sum(-1, keepdim=True)
    rho = 1 - _comb_ratio(n - c, n, k)  # the group's unbiased pass@k
    sigma = (rho * (1 - rho)).sqrt()
    wrong_share = _comb_ratio(n - c - 1, n - 1, k - 1)  # C(n-c-1, k-1) / C(n-1, k-1)
    adv = torch.where(correct.bool(), 1 - rho, 1 - rho - wrong_share)
    return torch.where(sigma > 0, adv / sigma.clamp_min(1e-12), torch.zeros_like(adv))


def _comb_ratio(a: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """C(a, k) / C(b, k) for integer-valued a <= b (0 where a < k), as prod_{i<k} (a - i) / (b - i)."""
    out = torch.ones_like(a)
    for i in range(k):
        out = out * ((a - i) / (b - i)).clamp_min(0)
    return out


def w_reinforce_advantages(correct: torch.Tensor, positive_weight: float) -> torch.Tensor:
    """W-REINFORCE (arXiv 2506.01347): a correct text gets +positive_weight, a wrong one -1, with no
    group normalisation. Most of the signal pushes probability away from wrong answers and spreads
    it over the rest, instead of piling it on the answers already found (what sharpens pass@k away)."""
    return torch.where(correct.bool(), torch.full_like(correct.float(), positive_weight),
                       torch.full_like(correct.float(), -1.0))


def text_advantages_by(cfg, rewards: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """A group's text advantages (last dim = the group) by `cfg.method.advantage` (cfg an RLConfig
    whose method is a GRPOConfig or one built on it): "grpo" normalises the rewards; "pass_at_k"
    and "w_reinforce" read the verifier's correctness alone (format rewards, when weighted in, do
    not count)."""
    if cfg.method.advantage == "grpo":
        return group_advantages(rewards, clip=cfg.adv_clip)
    if cfg.method.advantage == "pass_at_k":
        return pass_at_k_advantages(correct, cfg.method.pass_k)
    if cfg.method.advantage == "w_reinforce":
        return w_reinforce_advantages(correct, cfg.method.positive_weight)
    raise ValueError(f"unknown advantage {cfg.method.advantage!r}: use grpo, pass_at_k or w_reinforce")
