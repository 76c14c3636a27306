"""The interface every RL method implements, so that the trainer's loop (optimiser, logging,
checkpoints, resume, DDP, evaluation) names no method.

An algorithm owns what is particular to it: its settings (`Config`), which checkpoint kind it starts from, which modules
train and at what learning rate, the frozen reference it regularises towards, how it rolls out a
batch of questions, and its loss on that rollout.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from ladi_core.backends import SamplingParams
from ladi_core.checkpoint import Checkpoint
from ladi_core.generation import Reasoner
from ladi_core.tasks import Question
from ladi_core.verifiers import Verifier

from ..rewards import RewardFn
from ..rollout import Scored

if TYPE_CHECKING:
    from ..rl_config import RLConfig


class Rollout(Protocol):
    """What the loop reads from any method's rollout."""

    scored: Scored
    plan_distance: float  # mean pairwise distance of a question's plans (0 without plans)

    @property
    def group_values(self) -> torch.Tensor: ...


class Algorithm(ABC):
    name: ClassVar[str]
    needs: ClassVar[str]  # the checkpoint kind it trains from ("latent" | "token")
    policy_kind: ClassVar[str | None] = None  # latent: the plan policy it trains ("diffusion", ...)
    # latent: how a checkpoint with that policy is made (named when the wrong kind is given)
    made_by: ClassVar[str] = ""
    Config: ClassVar[type]  # its own settings (a frozen dataclass): RLConfig.method, `self.method`

    def __init__(self, cfg: RLConfig, reasoner: Reasoner, decoder: torch.nn.Module, verifier: Verifier,
                 rewards: list[RewardFn]):
        """reasoner: the checkpoint on its training backend; decoder: that backend's in-process
        decoder module (its training handle); rewards: summed per text."""
        self.cfg, self.reasoner, self.decoder = cfg, reasoner, decoder
        self.method = cfg.method
        self.verifier, self.rewards = verifier, rewards
        self._ref: torch.nn.Module | None = None  # a subclass with a KL term sets its frozen copy
        self.check_init(reasoner.checkpoint)

    def check_init(self, ck: Checkpoint) -> None:
        kind = "latent" if ck.is_latent else "token"
        if kind != self.needs:
            words = {"latent": "latent", "token": "token-level"}
            hint = " (use its -token twin)" if self.needs == "token" else ""
            raise SystemExit(f"--algo {self.name} trains a {words[self.needs]} checkpoint; {ck.path} is "
                             f"{words[kind]}{hint}")
        if self.policy_kind is not None and ck.policy.kind != self.policy_kind:
            how = f" (make one with {self.made_by})" if self.made_by else ""
            raise SystemExit(f"--algo {self.name} needs a checkpoint with the {self.policy_kind} policy; "
                             f"{ck.path} holds the {ck.policy.kind} policy{how}")

    @abstractmethod
    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups, each with its learning rate."""

    @abstractmethod
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """The modules that change, by name: the resumable state saves and restores exactly these."""

    @property
    def decoder_training(self) -> str | None:
        """Why the decoder trains (the flag to name when a rollout engine cannot follow its
        weights), or None when it stays frozen."""
        return None

    def begin_step(self, step: int) -> None:
        """Called before each step's rollout (also after a resume), for a method with a schedule."""
        return None

    @abstractmethod
    def rollout(self, reasoner: Reasoner, questions: list[Question], seeds: list[int], generator: torch.Generator,
                params: SamplingParams) -> Rollout:
        """Sample and score texts for `questions` with `reasoner` (the rollout engine), no gradients."""

    @abstractmethod
    def loss(self, rollout: Any, old: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective on one rollout. `old` keeps the behaviour policy's log-probabilities from
        the first epoch (so its ratio is exactly 1) for the later PPO epochs."""

    def checkpoint_parts(self) -> dict[str, Any]:
        """What `save_checkpoint` writes beside the decoder (the codec and the plan policy)."""
        ck = self.reasoner.checkpoint
        return {"codec": ck.codec, "policy": ck.policy} if ck.is_latent else {}
