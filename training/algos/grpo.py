"""Token-level GRPO: group-normalised advantages on sampled texts, clipped token ratios, an
optional k3 KL to a frozen reference decoder, and two loss normalisations:

- `grpo`:    mean over each sequence's tokens, then mean over sequences (DeepSeekMath);
- `dr_grpo`: sum over tokens / (sequences x max_new_tokens), a constant normaliser (Dr. GRPO),
             which removes the length bias of the per-sequence mean.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch

from ladi_core.codec import build_inputs_embeds

from ..common import teacher_forcing
from ..rollout import completion_ids, token_rollout
from .base import Algorithm
from .common import clipped_surrogate, text_advantages_by


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO on the decoder's texts: token GRPO's, Coconut GRPO's, and LaDi-RL's text policy's."""

    # the texts' advantages: "grpo" normalises each group's rewards; "pass_at_k" is the closed-form
    # pass@k advantage at pass_k (arXiv 2508.10751); "w_reinforce" gives a correct text
    # +positive_weight and a wrong one -1 (arXiv 2506.01347)
    advantage: Literal["grpo", "pass_at_k", "w_reinforce"] = "grpo"
    pass_k: int = 8  # the k of --advantage pass_at_k
    positive_weight: float = 0.1  # a correct text's advantage under --advantage w_reinforce
    grpo_clip: float = 0.2  # the token ratio's clip
    # the loss's normalisation: per-sequence token mean (grpo) or a constant (dr_grpo)
    loss_norm: Literal["grpo", "dr_grpo"] = "grpo"

    def check(self, cfg) -> None:
        group = cfg.plans * cfg.samples_per_plan
        if self.advantage == "pass_at_k" and not 1 <= self.pass_k <= group:
            raise ValueError(f"pass_k is {self.pass_k}: it must be in 1..{group} (the texts per question)")


def token_log_probs(model, prefixes: list[torch.Tensor], completions: list[list[int]],
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of each completion token after its prefix embeddings.
    Returns (logp [B, T], mask [B, T]) with T the longest completion; right padding."""
    x, attn, labels = teacher_forcing(prefixes, completions, model.get_input_embeddings())
    t_max, c_max = x.shape[1], max(1, max(len(c) for c in completions))
    logits = model(inputs_embeds=x, attention_mask=attn.long()).logits.float() / temperature
    # the logit at the last prefix position predicts token 0
    starts = torch.tensor([p.shape[0] - 1 for p in prefixes], device=x.device)
    idx = (starts[:, None] + torch.arange(c_max, device=x.device)[None]).clamp_max(t_max - 1)
    mask = torch.arange(c_max, device=x.device)[None] < torch.tensor([len(c) for c in completions],
                                                                      device=x.device)[:, None]
    targets = labels.gather(1, (idx + 1).clamp_max(t_max - 1)).masked_fill(~mask, 0)
    picked = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))
    logp = torch.log_softmax(picked, -1).gather(-1, targets[..., None]).squeeze(-1)
    return logp * mask, mask


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip: float,
              norm: str = "grpo", max_new_tokens: int | None = None, logp_ref: torch.Tensor | None = None,
              kl_beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """logp_*: [B, T] with mask [B, T]; adv: [B]."""
    per_tok, stats = clipped_surrogate(logp_new, logp_old, adv[:, None], clip)
    m = mask.float()
    if logp_ref is not None and kl_beta:
        d = logp_ref - logp_new
        kl = torch.exp(d) - d - 1  # k3 estimator, >= 0
        per_tok = per_tok + kl_beta * kl
        stats["kl_ref"] = ((kl * m).sum() / m.sum().clamp_min(1)).item()
    if norm == "grpo":
        loss = ((per_tok * m).sum(-1) / m.sum(-1).clamp_min(1)).mean()
    elif norm == "dr_grpo":
        denom = per_tok.shape[0] * (max_new_tokens or per_tok.shape[1])
        loss = (per_tok * m).sum() / denom
    else:
        raise ValueError(f"unknown loss normalisation {norm!r}: use grpo or dr_grpo")
    with torch.no_grad():
        stats["clip_frac"] = (((torch.exp(logp_new - logp_old) - 1).abs() > clip).float() * m).sum().item() / max(
            1.0, m.sum().item())
    return loss, stats


def text_policy_loss(decoder, prefixes: list[torch.Tensor], scored, adv: torch.Tensor, old: dict, cfg, eos_id: int,
                     reference=None) -> tuple[torch.Tensor, dict]:
    """GRPO on the decoder's texts after their prefixes (token GRPO, and LaDi-RL's text policy)."""
    comps = [completion_ids(d, eos_id) for row in scored.decoded for d in row]
    logp, mask = token_log_probs(decoder, prefixes, comps, cfg.temperature)
    ref = None
    if reference is not None:
        with torch.no_grad():
            ref, _ = token_log_probs(reference, prefixes, comps, cfg.temperature)
    # the behaviour policy's log-probs: the first epoch's own, so its ratio is exactly 1
    logp_old = old.setdefault("tokens", logp.detach())
    m = cfg.method
    return grpo_loss(logp, logp_old, adv.flatten(), mask, m.grpo_clip, m.loss_norm, cfg.max_new_tokens, ref,
                     cfg.kl_beta)


class GRPO(Algorithm):
    """Token-level GRPO: the decoder is the policy; G = plans x samples_per_plan texts per question."""

    name = "grpo"
    needs = "token"
    Config = GRPOConfig

    def __init__(self, cfg, reasoner, decoder, verifier, rewards):
        super().__init__(cfg, reasoner, decoder, verifier, rewards)
        self._ref = copy.deepcopy(decoder).eval() if cfg.kl_beta else None

    def param_groups(self):
        return [{"params": list(self.decoder.parameters()), "lr": self.cfg.lr}]

    def trainable_modules(self):
        return {"decoder": self.decoder}

    @property
    def decoder_training(self):
        return "--algo grpo"

    def rollout(self, reasoner, questions, seeds, generator, params):
        cfg = self.cfg
        return token_rollout(reasoner, questions, self.verifier, group=cfg.plans * cfg.samples_per_plan,
                             params=params, seeds=seeds, rewards=self.rewards,
                             advantages=lambda s: text_advantages_by(cfg, s.rewards, s.correct))

    def loss(self, ro, old):
        g = self.cfg.plans * self.cfg.samples_per_plan
        embeds = build_inputs_embeds(self.decoder.get_input_embeddings(), ro.prompt_ids)  # with grad
        return text_policy_loss(self.decoder, [e for e in embeds for _ in range(g)], ro.scored, ro.advantages, old,
                                self.cfg, self.reasoner.tokenizer.eos_token_id, self._ref)
