"""RL for latent-space thinking (arXiv 2512.11816), on a recurrent (Coconut) checkpoint.

Both variants roll out the same way: each question's thoughts computed once, without gradient,
then G texts decoded after `[prompt; bot; thoughts; eot]` and scored (correctness + format).

- `coconut-grpo` (variant 1): the thoughts are detached constants; GRPO's log-probabilities and
  clipped ratios cover only the language tokens after the latent block. The decoder trains.
- `latent-rl` (variant 2): a linear value head reads each thought and is co-trained online with
  BCE towards the question's share of correct texts; the policy loss is -mean sigmoid(value(h))
  over the thoughts, recomputed with gradient and back-propagated into the decoder, the head's
  weights held constant in that term. The paper uses no KL, no reference and no noise. Here the
  thoughts stay noise-free (they are deterministic, so a ratio has nothing to be the ratio of);
  `--kl-beta` adds an anchor to the initial decoder's thoughts, 0.5 ||h - h_ref||^2 per thought:
  the KL between unit-variance Gaussians centred on them. Off by default, as in the paper.
  `--value-warmup S` trains only the head for the first S steps, on the initial decoder's
  rollouts, as the paper pre-trains its critic before the policy term reads it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ladi_core.codec import build_inputs_embeds
from ladi_core.generation import pad_embeds
from ladi_core.policies import RecurrentPolicy

from ..rollout import TokenRollout, token_rollout
from .base import Algorithm
from .common import text_advantages_by
from .grpo import GRPOConfig, text_policy_loss


@dataclass(frozen=True)
class LatentRLConfig:
    """Latent RL: the decoder's thoughts climb a value head's score; the head learns by BCE."""

    value_lr: float = 1e-3  # the value head's learning rate; its target is each question's share of correct texts
    # the first steps train only the value head, on the initial decoder's rollouts, as the paper
    # pre-trains its critic before the policy term reads it (0: co-trained from the first step)
    value_warmup: int = 0


class _Thinking(Algorithm):
    """What both variants share: the recurrent checkpoint, its rollout, a decoder that trains."""

    needs = "latent"
    policy_kind = RecurrentPolicy.kind
    made_by = "python -m training.coconut_sft"

    def __init__(self, cfg, reasoner, decoder, verifier, rewards):
        super().__init__(cfg, reasoner, decoder, verifier, rewards)
        ck = reasoner.checkpoint
        self.policy: RecurrentPolicy = ck.policy
        ck.codec.requires_grad_(False)  # bot and eot: the frame stays as the curriculum left it

    @property
    def group(self) -> int:
        return self.cfg.plans * self.cfg.samples_per_plan  # texts per question: the shared budget

    @property
    def decoder_training(self):
        return f"--algo {self.name}"

    def rollout(self, reasoner, questions, seeds, generator, params) -> TokenRollout:
        return token_rollout(reasoner, questions, self.verifier, group=self.group, params=params, seeds=seeds,
                             rewards=self.rewards, adv_clip=self.cfg.adv_clip, advantages=self.text_advantages())

    def text_advantages(self):
        """The texts' advantages from their scores, or None for group-normalised rewards."""
        return None

    def prompt_embeds(self, ro: TokenRollout) -> list[torch.Tensor]:
        """The prompts embedded by the decoder being trained (so with gradient)."""
        return build_inputs_embeds(self.decoder.get_input_embeddings(), ro.prompt_ids)


class CoconutGRPO(_Thinking):
    name = "coconut-grpo"
    Config = GRPOConfig

    def text_advantages(self):
        return lambda scored: text_advantages_by(self.cfg, scored.rewards, scored.correct)

    def __init__(self, cfg, reasoner, decoder, verifier, rewards):
        super().__init__(cfg, reasoner, decoder, verifier, rewards)
        self.policy.requires_grad_(False)  # the value head is latent RL's, not used here
        self._ref = copy.deepcopy(decoder).eval().requires_grad_(False) if cfg.kl_beta else None

    def param_groups(self):
        return [{"params": list(self.decoder.parameters()), "lr": self.cfg.lr}]

    def trainable_modules(self):
        return {"decoder": self.decoder}

    def loss(self, ro: TokenRollout, old):
        prefixes = self.reasoner.prefixes(self.prompt_embeds(ro), ro.thoughts.detach())  # constants: no gradient
        rows = [p for p in prefixes for _ in range(self.group)]
        return text_policy_loss(self.decoder, rows, ro.scored, ro.advantages, old, self.cfg,
                                self.reasoner.tokenizer.eos_token_id, self._ref)


def value_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE of each thought's value logit [Q, L] towards its question's share of correct texts [Q]."""
    return F.binary_cross_entropy_with_logits(logits, target[:, None].expand_as(logits))


class LatentRL(_Thinking):
    name = "latent-rl"
    Config = LatentRLConfig

    def __init__(self, cfg, reasoner, decoder, verifier, rewards):
        super().__init__(cfg, reasoner, decoder, verifier, rewards)
        self.policy.train()
        self._ref = None
        self._warming = self.method.value_warmup > 0
        if cfg.kl_beta:
            ref_policy = copy.deepcopy(self.policy)
            ref_policy.bind(copy.deepcopy(decoder).eval().requires_grad_(False), reasoner.checkpoint.codec)
            self._ref = ref_policy.eval()

    def param_groups(self):
        return [{"params": list(self.decoder.parameters()), "lr": self.cfg.lr},
                {"params": list(self.policy.parameters()), "lr": self.method.value_lr}]

    def trainable_modules(self):
        return {"decoder": self.decoder, "policy": self.policy}

    def begin_step(self, step: int) -> None:
        self._warming = step < self.method.value_warmup

    def loss(self, ro: TokenRollout, old):
        with torch.set_grad_enabled(not self._warming):  # warming up: the decoder is left alone
            cond, mask = pad_embeds(self.prompt_embeds(ro))
            h = self.policy.think(cond, mask)  # [Q, L, hidden], with gradient into the decoder
        target = ro.scored.correct.mean(-1).to(h.device)  # [Q] the share of the question's texts that were right
        bce = value_loss(self.policy.value(h.detach()), target)
        score = torch.sigmoid(self.policy.value(h, detach_head=True))  # [Q, L]
        stats = {"value_bce": bce.item(), "value_score": score.mean().item(), "value_target": target.mean().item()}
        if self._warming:
            return bce, stats
        loss = -score.mean() + bce
        if self._ref is not None:
            with torch.no_grad():
                ref_embeds = build_inputs_embeds(self._ref.decoder.get_input_embeddings(), ro.prompt_ids)
                h_ref = self._ref.think(pad_embeds(ref_embeds)[0], mask)
            kl = 0.5 * (h - h_ref).pow(2).sum(-1).mean()
            loss = loss + self.cfg.kl_beta * kl
            stats["kl_ref"] = kl.item()
        return loss, stats
