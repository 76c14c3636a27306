"""LaDi-RL's plan-policy objective: Flow-GRPO on the diffusion sampler's stochastic steps.

One advantage per plan (its decoder-marginalised utility, normalised over the M plans of its
question) is shared by every denoising step of that plan; each step's ratio is clipped
(Flow-GRPO); the transitions are re-scored by the policy's own `rescore`. Optional KL to a frozen
reference policy: ||mean - mean_ref||^2 / (2 std^2) per step.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch

from ladi_core.flow import Repulsion
from ladi_core.policies import DiffusionPolicy
from ladi_core.tasks import get_task

from ..common import step_rng
from ..rollout import LatentRollout, latent_rollout
from ..stage import Examples, latent_reconstruction_loss
from .base import Algorithm
from .common import clipped_surrogate, group_advantages, pass_at_k_advantages, text_advantages_by
from .grpo import GRPOConfig, text_policy_loss


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


@dataclass(frozen=True)
class LadiConfig(GRPOConfig):
    """LaDi-RL: Flow-GRPO on the plan policy's denoising steps; with text_policy_coef > 0, GRPO on
    the decoder's texts given their plans too (the GRPO fields it inherits)."""

    train_denoising_steps: int = 10  # fewer than inference (the checkpoint's sampler.steps)
    noise_level: float = 0.7  # SDE `a` (Flow-GRPO)
    clip: float = 0.2  # per-step ratio clip (Flow-GRPO uses 1e-4 on image latents; ours are tiny)
    guidance: float = 1.0  # the rollouts' classifier-free guidance
    diversity: float = 0.0  # the rollouts' repulsion between a question's plans
    repulsion: Repulsion = "ladir"  # the diversity guidance's kernel (flow.repulsion)
    text_policy_coef: float = 0.0  # add token-level GRPO on the decoder, given each text's plan
    text_lr: float = 1e-5  # the decoder's learning rate under the text policy
    # keep the decoder reading its plan while the text policy trains: + anchor_coef x the writer's
    # loss (a reference solution's CE given [prompt; bot; adapter(z); eot], z from the frozen codec's
    # posterior of that solution) on anchor_batch training examples a step
    anchor_coef: float = 0.0
    anchor_batch: int = 32
    # the text policy's groups: each text against all M x N texts of its question, or ("plan")
    # against the N texts of its own plan, so that plan quality is left to the plan policy
    text_advantages: Literal["question", "plan"] = "question"
    # the plans' advantages: "grpo" normalises each question's plan utilities (the mean reward of a
    # plan's texts); "pass_at_k" is the closed-form pass@k advantage at plan_pass_k over the
    # question's M plans, a plan counting as correct when any of its N texts is (a plan that adds a
    # solution no other plan found gains; one more plan on an answer already found gains nothing)
    plan_advantage: Literal["grpo", "pass_at_k"] = "grpo"
    plan_pass_k: int = 4

    def check(self, cfg) -> None:
        super().check(cfg)
        if self.plan_advantage == "pass_at_k" and not 1 <= self.plan_pass_k <= cfg.plans:
            raise ValueError(f"plan_pass_k is {self.plan_pass_k}: it must be in 1..{cfg.plans} (the plans per "
                             "question)")
        if self.anchor_coef and self.text_policy_coef <= 0:
            raise ValueError("anchor_coef keeps a training decoder reading its plan: it needs text_policy_coef > 0")


def text_advantages(rewards: torch.Tensor, correct: torch.Tensor, samples_per_plan: int, cfg) -> torch.Tensor:
    """The text policy's advantages. rewards, correct: [questions, plans x texts], a plan's texts
    consecutive. cfg.method.text_advantages="question": groups of all a question's texts (a text
    from a good plan scores high); "plan": the texts of its own plan only (the plan's quality is the plan
    policy's business, the decoder is credited only for doing better than that plan's other texts).
    Within a group, `cfg.method.advantage` decides the values (`text_advantages_by`)."""
    shape = rewards.shape if cfg.method.text_advantages == "question" else (-1, samples_per_plan)
    return text_advantages_by(cfg, rewards.reshape(shape), correct.reshape(shape)).reshape(rewards.shape)


def plan_advantages(utility: torch.Tensor, correct: torch.Tensor, samples_per_plan: int, cfg) -> torch.Tensor:
    """The plan policy's advantages [questions, plans] by `cfg.method.plan_advantage`: utilities
    (the mean reward of each plan's texts) normalised over the question's plans, or the pass@k
    advantage of plans that solved the question (any of their texts correct: `correct` is
    [questions, plans x texts], a plan's texts consecutive)."""
    if cfg.method.plan_advantage == "grpo":
        return group_advantages(utility, clip=cfg.adv_clip)
    solved = correct.reshape(utility.shape[0], -1, samples_per_plan).amax(-1)
    return pass_at_k_advantages(solved, cfg.method.plan_pass_k)


def plan_anchor_loss(decoder, codec, data: Examples, batch: int, seed: int, step: int,
                     pad: int) -> tuple[torch.Tensor, float]:
    """The writer's loss on `batch` training examples: each reference solution's CE given
    [prompt; bot; adapter(z); eot], z the frozen codec's posterior of it (with the writer's noise and
    token substitution). Added to the text policy's loss it keeps the decoder reading its plan.
    Returns the loss (its KL part is a constant: the codec is frozen) and the CE in nats a token."""
    rng, gen = step_rng(seed, "anchor", step)
    prompts, comps = data.batch(batch, rng)
    loss, stats = latent_reconstruction_loss(decoder, codec, prompts, comps, pad, gen)
    return loss, stats["ce"]


class LadiRL(Algorithm):
    """The plan policy (the diffusion denoiser) trains on hierarchical rollouts: M plans per
    question, N texts per plan. With `text_policy_coef > 0` the decoder also trains, by GRPO on
    each text given its plan."""

    name = "ladi"
    needs = "latent"
    policy_kind = DiffusionPolicy.kind
    made_by = "python -m training.sft"
    Config = LadiConfig

    def __init__(self, cfg, reasoner, decoder, verifier, rewards):
        super().__init__(cfg, reasoner, decoder, verifier, rewards)
        ck = reasoner.checkpoint
        # train mode throughout: the denoiser has no dropout, so a rollout's log-probs and the
        # loss's re-scoring see the same function.
        self.policy = ck.policy.train()
        ck.codec.requires_grad_(False)
        self.decoder.requires_grad_(cfg.method.text_policy_coef > 0)
        self._ref = copy.deepcopy(self.policy).eval() if cfg.kl_beta else None
        self._anchor_data = Examples(get_task(cfg.task), reasoner.tokenizer) if cfg.method.anchor_coef else None
        self._step = 0

    def begin_step(self, step):
        self._step = step

    def param_groups(self):
        groups = [{"params": list(self.policy.parameters()), "lr": self.cfg.lr}]
        if self.method.text_policy_coef > 0:
            groups.append({"params": list(self.decoder.parameters()), "lr": self.method.text_lr})
        return groups

    def trainable_modules(self):
        mods = {"policy": self.policy}
        if self.method.text_policy_coef > 0:
            mods["decoder"] = self.decoder
        return mods

    @property
    def decoder_training(self):
        return "--text-policy-coef > 0" if self.method.text_policy_coef > 0 else None

    def rollout(self, reasoner, questions, seeds, generator, params) -> LatentRollout:
        cfg, m = self.cfg, self.method
        sampler = {"steps": m.train_denoising_steps, "noise_level": m.noise_level, "guidance": m.guidance,
                   "diversity": m.diversity, "repulsion": m.repulsion}
        return latent_rollout(reasoner, questions, self.verifier, plans=cfg.plans,
                              samples_per_plan=cfg.samples_per_plan, params=params, seeds=seeds, generator=generator,
                              rewards=self.rewards, sampler=sampler,
                              advantages=lambda u, s: plan_advantages(u, s.correct, cfg.samples_per_plan, cfg))

    def loss(self, ro: LatentRollout, old):
        cfg, hp = self.cfg, self.method
        sampler = {"guidance": hp.guidance, "diversity": hp.diversity, "noise_level": hp.noise_level,
                   "repulsion": hp.repulsion}
        now = self.policy.rescore(ro.plans, ro.cond, ro.cond_mask, **sampler)
        kl = None
        if self._ref is not None:
            with torch.no_grad():
                ref = self._ref.rescore(ro.plans, ro.cond, ro.cond_mask, **sampler)
            kl = reference_kl(now.means, ref.means, now.stds)
        loss, stats = ladi_loss(now.log_probs, ro.plans.log_probs, ro.advantages.flatten(), hp.clip, kl, cfg.kl_beta)
        if hp.text_policy_coef > 0:
            m, n = cfg.plans, cfg.samples_per_plan
            rows = torch.arange(len(ro.prompt_embeds) * m).repeat_interleave(n)  # (question, plan) per text
            with torch.no_grad():  # the decoder trains here, not the plans
                prefixes = self.reasoner.prefixes([ro.prompt_embeds[int(r) // m] for r in rows],
                                                  ro.plans.latents[rows.to(ro.plans.latents.device)])
            q = len(ro.prompt_embeds)
            adv = text_advantages(ro.scored.rewards.view(q, m * n), ro.scored.correct.view(q, m * n), n, cfg)
            text_loss, _ = text_policy_loss(self.decoder, prefixes, ro.scored, adv, old, cfg,
                                            self.reasoner.tokenizer.eos_token_id)
            loss = loss + hp.text_policy_coef * text_loss
            stats["text_loss"] = text_loss.item()
        if hp.anchor_coef:
            anchor, stats["anchor_ce"] = plan_anchor_loss(self.decoder, self.reasoner.checkpoint.codec,
                                                          self._anchor_data, hp.anchor_batch, cfg.seed, self._step,
                                                          self.reasoner.tokenizer.pad_token_id)
            loss = loss + hp.anchor_coef * anchor
        return loss, stats
