"""Typed configuration for `python -m training.rl`, with the smoke and demo presets.

Every algorithm draws the same number of texts per question (the latent ones: M plans x N texts;
the token-level ones: G = M x N texts) and shares every budget field, so one evaluation judges them on equal terms.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal, get_args, get_type_hints

from ladi_core.backends.vllm import VLLMOptions


@dataclass(frozen=True)
class RLConfig:
    algo: Literal["ladi", "grpo", "dlr", "coconut-grpo", "latent-rl"] = "ladi"
    task: str = "countdown"
    verifier: str | None = None
    seed: int = 0
    # budget (shared)
    steps: int = 200
    questions_per_step: int = 16
    plans: int = 8  # M (GRPO: G = plans x samples_per_plan)
    samples_per_plan: int = 4  # N
    lr: float = 2e-5  # the plan log-densities are steep (tiny late-step variances): small steps
    ppo_epochs: int = 1  # optimiser steps per rollout (the first one is exactly on-policy)
    temperature: float = 1.0
    max_new_tokens: int = 96
    format_weight: float = 0.0  # reward = correct + format_weight * format
    adv_clip: float = 5.0
    # the texts' advantages (token GRPO, and LaDi-RL's text policy): "grpo" normalises each group's
    # rewards; "pass_at_k" is the closed-form pass@k advantage at `pass_k` (arXiv 2508.10751);
    # "w_reinforce" gives a correct text +positive_weight and a wrong one -1 (arXiv 2506.01347)
    advantage: Literal["grpo", "pass_at_k", "w_reinforce"] = "grpo"
    pass_k: int = 8
    positive_weight: float = 0.1
    # LaDi-RL (plan policy)
    train_denoising_steps: int = 10  # fewer than inference (the checkpoint's sampler.steps)
    noise_level: float = 0.7  # SDE `a`
    clip: float = 0.2  # per-step ratio clip (Flow-GRPO uses 1e-4 on image latents; ours are tiny)
    kl_beta: float = 0.0  # KL to the frozen initial policy (LaDi) or decoder (GRPO)
    guidance: float = 1.0
    diversity: float = 0.0
    repulsion: Literal["ladir", "rbf"] = "ladir"  # the diversity guidance's kernel (flow.repulsion)
    text_policy_coef: float = 0.0  # LaDi: add token-level GRPO on the decoder, given each text's plan
    text_lr: float = 1e-5
    # LaDi: keep the decoder reading its plan while the text policy trains: + anchor_coef x the
    # writer's loss (a reference solution's CE given [prompt; bot; adapter(z); eot], z from the frozen
    # codec's posterior of that solution) on anchor_batch training examples a step
    anchor_coef: float = 0.0
    anchor_batch: int = 32
    # the text policy's groups: each text against all M x N texts of its question, or ("plan")
    # against the N texts of its own plan, so that plan quality is left to the plan policy
    text_advantages: Literal["question", "plan"] = "question"
    # DLR (assistant policy): InfoNCE over a question's slots, SoftCoT++'s temperature
    contrastive_weight: float = 0.01  # 0.1 at lr 1e-3 pushed the plans apart and the reward down
    contrastive_tau: float = 0.05
    # latent RL (recurrent policy): the value head's learning rate; its BCE target is each
    # question's share of correct texts
    value_lr: float = 1e-3
    # latent RL: the first steps train only the value head, on the initial decoder's rollouts, as the
    # paper pre-trains its critic before the policy term reads it (0: co-trained from the first step)
    value_warmup: int = 0
    # GRPO (token policy)
    grpo_clip: float = 0.2
    loss_norm: Literal["grpo", "dr_grpo"] = "grpo"
    # bookkeeping
    save_every: int = 50
    eval_questions: int = 100
    eval_k: tuple[int, ...] = (1, 8)
    threads: int = 0
    rollout_backend: Literal["transformers", "vllm"] = "transformers"  # vllm: texts decoded by a vLLM engine
    vllm: VLLMOptions = VLLMOptions(dtype="float32", max_model_len=512, cpu_kvcache_space_gib=2)

    def __post_init__(self):
        """The Literal fields are checked here, not only by argparse: presets and code build configs too."""
        for name, hint in get_type_hints(type(self)).items():
            allowed = get_args(hint) if getattr(hint, "__origin__", None) is Literal else ()
            if allowed and getattr(self, name) not in allowed:
                raise ValueError(f"RLConfig.{name} is {getattr(self, name)!r}: use one of {', '.join(allowed)}")
        group = self.plans * self.samples_per_plan
        if self.advantage == "pass_at_k" and not 1 <= self.pass_k <= group:
            raise ValueError(f"RLConfig.pass_k is {self.pass_k}: it must be in 1..{group} (the texts per question)")
        if self.anchor_coef and self.algo != "ladi":
            raise ValueError(f"RLConfig.anchor_coef is LaDi-RL's (a plan-conditioned decoder), not {self.algo}'s")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


PRESETS: dict[str, RLConfig] = {
    "demo": RLConfig(),
    "smoke": RLConfig(steps=4, questions_per_step=4, plans=4, samples_per_plan=2, max_new_tokens=48,
                      train_denoising_steps=4, save_every=2, eval_questions=8, eval_k=(1, 2)),
}
