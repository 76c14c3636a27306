"""DLR: GRPO on an assistant's latent plans for a frozen decoder, plus a contrastive term that
keeps a question's plans apart.

Rollouts are LaDi-RL's hierarchical ones (M plans per question, N texts per plan, a plan's utility
the mean reward of its texts); the policy is the one-pass Gaussian assistant, so each plan has one
exact log-density and the ratio is clipped per plan. InfoNCE (SoftCoT++) over the question's
distinct slots: a plan's mean and its dropout view are positives, the other slots' negatives.
The decoder and codec never change, so a vLLM rollout engine needs no weight push.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ladi_core.policies import AssistantPolicy, info_nce

from ..rollout import LatentRollout, latent_rollout
from .base import Algorithm
from .common import clipped_surrogate


@dataclass(frozen=True)
class DLRConfig:
    """DLR: the clipped Gaussian GRPO on the assistant's plans, plus InfoNCE over a question's slots."""

    clip: float = 0.2  # the policy ratio's clip (DLR: per plan; LaDi-RL: per denoising step)
    contrastive_weight: float = 0.01  # 0.1 at lr 1e-3 pushed the plans apart and the reward down
    contrastive_tau: float = 0.05  # InfoNCE's temperature (SoftCoT++'s)


def dlr_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float,
             ) -> tuple[torch.Tensor, dict]:
    """logp_*: [plans] whole-plan log-densities; adv: [plans]. The clipped surrogate, plan mean."""
    per_plan, stats = clipped_surrogate(logp_new, logp_old, adv, clip)
    return per_plan.mean(), stats


def contrastive_term(means: torch.Tensor, plans_per_question: int, slots: int, dropout: float,
                     tau: float) -> torch.Tensor:
    """InfoNCE over each question's first min(M, K) plans (one per distinct slot; later plans repeat
    a slot's mean, which would be its own negative). means: [Q * M, L, d_z]."""
    k = min(plans_per_question, slots)
    if k < 2:
        return means.new_zeros(())
    per_q = means.view(-1, plans_per_question, means[0].numel())[:, :k]
    return info_nce(per_q, F.dropout(per_q, dropout, training=True), tau)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, log_std: torch.Tensor,
                ref_log_std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std) || N(ref_mean, ref_std)) per plan, summed over coordinates: [plans]."""
    var, ref_var = (2 * log_std).exp(), (2 * ref_log_std).exp()
    kl = ref_log_std - log_std + (var + (mean - ref_mean) ** 2) / (2 * ref_var) - 0.5
    return kl.flatten(1).sum(-1)


class DLR(Algorithm):
    name = "dlr"
    needs = "latent"
    policy_kind = AssistantPolicy.kind
    made_by = "python -m training.assistant_sft"
    Config = DLRConfig

    def __init__(self, cfg, reasoner, decoder, verifier, rewards):
        super().__init__(cfg, reasoner, decoder, verifier, rewards)
        ck = reasoner.checkpoint
        self.policy = ck.policy.train()
        ck.codec.requires_grad_(False)
        self.decoder.requires_grad_(False)  # frozen: nothing to forget
        self._ref = copy.deepcopy(self.policy).eval() if cfg.kl_beta else None

    def param_groups(self):
        return [{"params": list(self.policy.parameters()), "lr": self.cfg.lr}]

    def trainable_modules(self):
        return {"policy": self.policy}

    def rollout(self, reasoner, questions, seeds, generator, params) -> LatentRollout:
        cfg = self.cfg
        return latent_rollout(reasoner, questions, self.verifier, plans=cfg.plans,
                              samples_per_plan=cfg.samples_per_plan, params=params, seeds=seeds, generator=generator,
                              rewards=self.rewards, adv_clip=cfg.adv_clip)

    def loss(self, ro: LatentRollout, old):
        cfg, hp = self.cfg, self.method
        now = self.policy.rescore(ro.plans, ro.cond, ro.cond_mask)
        means = now.means[0]
        loss, stats = dlr_loss(now.log_probs[:, 0], ro.plans.log_probs[:, 0], ro.advantages.flatten(), hp.clip)
        if hp.contrastive_weight:
            nce = contrastive_term(means, cfg.plans, self.policy.cfg.slots, self.policy.cfg.dropout,
                                   hp.contrastive_tau)
            loss = loss + hp.contrastive_weight * nce
            stats["info_nce"] = nce.item()
        if self._ref is not None:
            with torch.no_grad():
                ref_means = self._ref.rescore(ro.plans, ro.cond, ro.cond_mask).means[0]
            kl = gaussian_kl(means, ref_means, self.policy.log_std, self._ref.log_std)
            loss = loss + cfg.kl_beta * kl.mean()
            stats["kl_ref"] = kl.mean().item()
        stats["plan_std"] = self.policy.std().mean().item()
        return loss, stats
