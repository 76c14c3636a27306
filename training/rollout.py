"""Hierarchical latent-text rollouts (LaDi-RL) and plain token rollouts (GRPO), shared by every
algorithm. Rollouts only sample and score; they hold no gradients.

Latent: per question, M plans from the SDE sampler (trajectory and per-step log-probs kept);
per plan, N texts decoded as one batch that shares the plan's prefix; each text scored by the
verifier; a plan's utility is the mean reward of its N texts, and its advantage is that utility
normalised over the question's M plans.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ladi_core.backends import Decoded, SamplingParams
from ladi_core.generation import Reasoner, pad_embeds
from ladi_core.metrics import mean_pairwise_distance
from ladi_core.policies import PlanSample
from ladi_core.tasks import Question
from ladi_core.verifiers import Verifier

from .algos.common import group_advantages
from .rewards import RewardFn


@dataclass
class Scored:
    decoded: list[list[Decoded]]  # [rows][samples]
    rewards: torch.Tensor  # [Q, G]: the weighted sum of the reward functions
    answers: list[list[str | None]]  # [Q][G]
    components: dict[str, float]  # each reward function's mean weighted value
    correct: torch.Tensor  # [Q, G] the verifier's correctness alone (latent RL's value target)


def score(questions: list[Question], decoded: list[list[Decoded]], per_question: int, verifier: Verifier,
          rewards: list[RewardFn]) -> Scored:
    """decoded rows are question-major; each question owns `per_question` consecutive texts."""
    flat = [d for row in decoded for d in row]
    totals, answers, correct = [], [], []
    parts = {f.name: 0.0 for f in rewards}
    for q_i, q in enumerate(questions):
        rs, ans, ok = [], [], []
        for d in flat[q_i * per_question:(q_i + 1) * per_question]:
            verdict = verifier.score(d.text, q.reference)
            ok.append(float(verdict.solved))
            values = [f(verdict, d.text, q) for f in rewards]
            for f, v in zip(rewards, values):
                parts[f.name] += v
            rs.append(sum(values))
            ans.append(verdict.answer)
        totals.append(rs)
        answers.append(ans)
        correct.append(ok)
    n = max(1, len(questions) * per_question)
    return Scored(decoded, torch.tensor(totals, dtype=torch.float32), answers, {k: v / n for k, v in parts.items()},
                  torch.tensor(correct, dtype=torch.float32))


@dataclass
class LatentRollout:
    prompt_embeds: list[torch.Tensor]
    cond: torch.Tensor  # [Q, T, hidden] padded prompt embeddings, as the policy sampled from them
    cond_mask: torch.Tensor  # [Q, T] True = real
    plans: PlanSample  # trajectory [K + 1, Q * M, L, d], log_probs [Q * M, K]
    scored: Scored  # rewards [Q, M * N], plan-major within a question
    utility: torch.Tensor  # [Q, M]
    advantages: torch.Tensor  # [Q, M]
    plan_distance: float

    @property
    def group_values(self) -> torch.Tensor:
        """What each group's advantages normalise (a group of equal values teaches nothing)."""
        return self.utility


@torch.no_grad()
def latent_rollout(reasoner: Reasoner, questions: list[Question], verifier: Verifier, *, plans: int,
                   samples_per_plan: int, params: SamplingParams, seeds: list[int], generator: torch.Generator,
                   rewards: list[RewardFn], sampler: dict | None = None, adv_clip: float | None = None,
                   advantages: Callable[[torch.Tensor, Scored], torch.Tensor] | None = None) -> LatentRollout:
    """sampler: the plan policy's sampling overrides (a diffusion policy's steps, noise level, ...).
    advantages: the method's own plan advantages from the utilities [Q, M] and the scored texts
    (default: the utilities normalised over each question's plans, clipped at adv_clip)."""
    m, n = plans, samples_per_plan
    embeds = reasoner.prompt_embeds(reasoner.prompt_ids([q.prompt for q in questions]))
    cond, mask = pad_embeds(embeds)
    # the plans start from each question's seeded noises (seeding.py); the SDE's noise is the rollout's
    sample = reasoner.checkpoint.policy.sample(cond, mask, m, generator=generator, sde=True,
                                               init_noise=reasoner.plan_noise(seeds, [m] * len(questions)),
                                               **(sampler or {}))
    rows = reasoner.rows(embeds, list(sample.latents.split(m)), [n] * len(questions),
                         [replace(params, seed=s) for s in seeds])
    scored = score(questions, reasoner.decode_rows(rows), m * n, verifier, rewards)
    utility = scored.rewards.view(len(questions), m, n).mean(-1)
    dist = sum(mean_pairwise_distance(sample.latents[i * m:(i + 1) * m]) for i in range(len(questions)))
    adv = advantages(utility, scored) if advantages is not None else group_advantages(utility, clip=adv_clip)
    return LatentRollout(embeds, cond, mask, sample, scored, utility, adv, dist / len(questions))


@dataclass
class TokenRollout:
    prompt_ids: list[list[int]]
    prompt_embeds: list[torch.Tensor]
    scored: Scored  # rewards [Q, G]
    advantages: torch.Tensor  # [Q, G]
    thoughts: torch.Tensor | None = None  # [Q, L, hidden] a deterministic thinker's one plan per question
    plan_distance: float = 0.0  # one prefix per question: no spread of plans

    @property
    def group_values(self) -> torch.Tensor:
        return self.scored.rewards


@torch.no_grad()
def token_rollout(reasoner: Reasoner, questions: list[Question], verifier: Verifier, *, group: int,
                  params: SamplingParams, seeds: list[int], rewards: list[RewardFn],
                  adv_clip: float | None = None,
                  advantages: Callable[[Scored], torch.Tensor] | None = None) -> TokenRollout:
    """G texts per question from its one prefix: the prompt, or for a deterministic thinker (the
    recurrent policy) the prompt and its thoughts, computed once and without gradient (Coconut GRPO).
    advantages: the method's own advantages from the scored texts (default: GRPO's group-normalised
    rewards, clipped at adv_clip)."""
    ids = reasoner.prompt_ids([q.prompt for q in questions])
    embeds = reasoner.prompt_embeds(ids)
    thoughts = reasoner.sample_plans(embeds, 1).latents if reasoner.is_latent else None
    rows = reasoner.rows(embeds, None if thoughts is None else list(thoughts.split(1)), [group] * len(questions),
                         [replace(params, seed=s) for s in seeds])
    scored = score(questions, reasoner.decode_rows(rows), group, verifier, rewards)
    adv = advantages(scored) if advantages is not None else group_advantages(scored.rewards, clip=adv_clip)
    return TokenRollout(ids, embeds, scored, adv, thoughts)


def completion_ids(d: Decoded, eos_id: int) -> list[int]:
    """The tokens a text policy is trained on: the sampled ids, plus the end token when one ended it."""
    return d.token_ids + [eos_id] if d.finish_reason == "stop" else list(d.token_ids)
