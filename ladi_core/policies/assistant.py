"""The assistant latent policy (DLR): a small model reads the question and proposes plans in one
pass, through a Gaussian head, for a frozen decoder.

K learned slot embeddings (SoftCoT++'s distinct initial thoughts) give K different plan means per
question; plan j of a question takes slot j mod K. Each plan is z = mean_slot + std * eps with one
learned log-std per latent dimension, so a plan has an exact log-probability (DLR leaves the
density unstated; this is the choice recorded in ladi.json). The plans live in the codec's
normalised latent space and enter the decoder through the codec's adapter, like a diffusion plan,
so every backend serves them unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import seeding
from .base import LatentPolicy, PlanSample, Rescored
from .layers import Block, encode_question


@dataclass(frozen=True)
class AssistantPolicyConfig:
    latent_tokens: int = 4
    latent_dim: int = 32
    hidden_size: int = 128  # the decoder's embedding width (the question arrives as its embeddings)
    d_model: int = 128
    encoder_layers: int = 2  # over the question
    layers: int = 2  # over the slot's latent queries, cross-attending to the question
    heads: int = 4
    slots: int = 8  # K distinct plan means per question
    max_cond_len: int = 256
    init_log_std: float = -1.0
    dropout: float = 0.5  # the contrastive term's second view of a plan (SoftCoT++: dropout 0.5)


@dataclass(frozen=True)
class AssistantSamplerConfig:
    """Inference defaults, overridable per call."""

    temperature: float = 1.0  # scales the learned std; 0 gives each slot's mean


class AssistantPolicy(LatentPolicy):
    kind = "assistant"
    overrides = frozenset(AssistantSamplerConfig.__dataclass_fields__)  # what `sample` accepts

    def __init__(self, cfg: AssistantPolicyConfig, sampler: AssistantSamplerConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.sampler = sampler or AssistantSamplerConfig()
        d = cfg.d_model
        self.cond_in = nn.Linear(cfg.hidden_size, d)
        self.cond_pos = nn.Parameter(torch.randn(cfg.max_cond_len, d) * 0.02)
        self.encoder = nn.ModuleList(Block(d, cfg.heads, cross=False) for _ in range(cfg.encoder_layers))
        self.encoder_norm = nn.LayerNorm(d)
        self.queries = nn.Parameter(torch.randn(cfg.latent_tokens, d) * 0.02)
        self.slot_emb = nn.Parameter(torch.randn(cfg.slots, d) * 0.5)  # large: slots start apart
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cross=True) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.latent_dim)
        self.log_std = nn.Parameter(torch.full((cfg.latent_dim,), cfg.init_log_std))

    # --- the density -------------------------------------------------------------------------------
    def means(self, cond: torch.Tensor, cond_mask: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each question's plan means, plan j from slot j mod K: [sum(counts), L, d_z]."""
        h, keep = encode_question(self, cond, cond_mask)
        mem = self.encoder_norm(h)
        reps = torch.tensor(counts, device=cond.device)
        slots = torch.cat([torch.arange(c, device=cond.device) % self.cfg.slots for c in counts])
        mem, keep = mem.repeat_interleave(reps, 0), keep.repeat_interleave(reps, 0)
        q = self.queries[None] + self.slot_emb[slots][:, None]
        for blk in self.blocks:
            q = blk(q, memory=blk.memory(mem), memory_mask=keep)
        return self.head(self.norm(q))

    def std(self, temperature: float = 1.0) -> torch.Tensor:
        return self.log_std.exp() * temperature

    def log_prob(self, z: torch.Tensor, mean: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Exact Gaussian log-density of each plan, summed over its L x d_z coordinates: [rows]."""
        if temperature <= 0:
            raise ValueError("a plan drawn at temperature 0 has no density")
        log_std = self.log_std + math.log(temperature)
        lp = -0.5 * ((z - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        return lp.flatten(1).sum(-1)

    # --- sampling (training and serving share it) --------------------------------------------------
    def sample(self, cond: torch.Tensor, cond_mask: torch.Tensor, num_plans: int | list[int], *,
               generator: torch.Generator | None = None, sde: bool = False, init_noise: torch.Tensor | None = None,
               **overrides) -> PlanSample:
        """`num_plans` plans per question in one pass. The draw is reparameterised (z = mean + std *
        eps), so a loss on the plans reaches the assistant. sde=True keeps each plan's log-density
        (`log_probs` [rows, 1]) and its mean (`trajectory` [1, rows, L, d_z]) for RL.
        init_noise: eps per plan row (a server draws it from each request's seed)."""
        counts = self.plan_counts(cond, num_plans)
        sc = self.settings(**overrides)
        mean = self.means(cond, cond_mask, counts)
        if init_noise is None:
            init_noise = seeding.randn(mean.shape, generator, device=cond.device)
        elif tuple(init_noise.shape) != tuple(mean.shape):
            raise ValueError(f"init_noise has shape {tuple(init_noise.shape)}, expected {tuple(mean.shape)}")
        z = mean + self.std(sc.temperature) * init_noise.to(mean.device, mean.dtype)
        group = counts[0] if len(set(counts)) == 1 else counts
        if not sde:
            return PlanSample(z, group, settings=sc)
        lp = self.log_prob(z.detach(), mean, sc.temperature)[:, None]
        return PlanSample(z, group, log_probs=lp, trajectory=mean[None], settings=sc)

    def rescore(self, plans: PlanSample, cond: torch.Tensor, cond_mask: torch.Tensor, **overrides) -> Rescored:
        """Log-density [rows, 1] of stored plans under the current weights, their means and the std."""
        sc = self.settings(plans.settings, **overrides)
        mean = self.means(cond, cond_mask, self.plan_counts(cond, plans.group_size))
        lp = self.log_prob(plans.latents.detach(), mean, sc.temperature)
        return Rescored(lp[:, None], [mean], [self.std(sc.temperature)])


def info_nce(student: torch.Tensor, teacher: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """SoftCoT++'s contrastive term over each question's K plans: plan k's student view should be
    closest to its own teacher view and far from the question's other plans.
    student, teacher: [Q, K, D]. Cosine similarities / tau, cross-entropy towards the diagonal."""
    if student.shape != teacher.shape or student.dim() != 3:
        raise ValueError(f"student and teacher must both be [questions, plans, dim], got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    logits = s @ t.transpose(1, 2) / tau  # [Q, K, K]
    target = torch.arange(student.shape[1], device=student.device).expand(student.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())
