"""Typed configuration for `python -m training.rl`: the fields every method shares (`RLConfig`),
and one nested config that the chosen method owns (`RLConfig.method`, the class its `Algorithm`
names as `Config`, e.g. `LadiConfig` in algos/ladi.py); the smoke and demo presets.

Every algorithm draws the same number of texts per question (the latent ones: M plans x N texts;
the token-level ones: G = M x N texts) and shares every budget field, so one evaluation judges them
on equal terms.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args, get_type_hints

from ladi_core.backends.vllm_options import VLLMOptions

from .algos import ALGORITHMS
from .common import Precision

AlgoName = Literal[tuple(ALGORITHMS)]  # the registry is the list


def check_literals(cfg: Any) -> None:
    """A dataclass's Literal fields hold one of their values (presets and code build configs too,
    not only argparse)."""
    for name, hint in get_type_hints(type(cfg)).items():
        allowed = get_args(hint) if getattr(hint, "__origin__", None) is Literal else ()
        if allowed and getattr(cfg, name) not in allowed:
            raise ValueError(f"{type(cfg).__name__}.{name} is {getattr(cfg, name)!r}: use one of "
                             f"{', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class RLConfig:
    algo: AlgoName = "ladi"
    task: str = "countdown"  # countdown, or a path to a .jsonl dataset
    verifier: str | None = None  # for JSONL tasks: math or code
    seed: int = 0
    steps: int = 200
    questions_per_step: int = 16
    plans: int = 8  # M latent plans per question (token methods: G = plans x samples_per_plan texts)
    samples_per_plan: int = 4  # N texts per plan
    lr: float = 2e-5  # the trained policy's learning rate
    ppo_epochs: int = 1  # optimiser steps per rollout (the first one is exactly on-policy)
    temperature: float = 1.0  # the texts' sampling temperature
    max_new_tokens: int = 96
    format_weight: float = 0.0  # reward = correct + format_weight * format
    adv_clip: float | None = 5.0  # group advantages are clipped to +-adv_clip
    kl_beta: float = 0.0  # KL to the frozen start: the plan policy (latent methods) or the decoder (token)
    save_every: int = 50
    eval_questions: int = 100  # the final held-out evaluation
    eval_k: tuple[int, ...] = (1, 8)
    threads: int = 0  # torch threads (0: torch's default)
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (this rank's GPU when there is one)
    precision: Precision = "fp32"  # bf16: rollouts and losses under autocast, float32 weights
    rollout_backend: Literal["transformers", "vllm"] = "transformers"  # vllm: texts decoded by a vLLM engine
    fsdp: bool = False  # under torchrun: shard the decoder's layers with FSDP2 (training/fsdp.py)
    vllm: VLLMOptions = VLLMOptions(dtype="float32", max_model_len=512, cpu_kvcache_space_gib=2)
    method: Any = None  # the algorithm's own config (ALGORITHMS[algo].Config); None: its defaults

    def __post_init__(self):
        check_literals(self)
        want = ALGORITHMS[self.algo].Config
        if self.method is None:
            object.__setattr__(self, "method", want())
        elif type(self.method) is not want:
            raise ValueError(f"--algo {self.algo} takes a {want.__name__}, got a {type(self.method).__name__}")
        check_literals(self.method)
        check = getattr(self.method, "check", None)
        if check is not None:
            check(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(RLConfig) if f.name != "method")


def method_fields(algo: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ALGORITHMS[algo].Config))


def build_config(algo: str, preset: dict[str, Any], given: dict[str, Any]) -> RLConfig:
    """RLConfig for `algo` from a preset (a flat dict: its method fields apply to whichever method
    has them) and the values given on the command line (a flat dict: a field that neither the
    shared config nor `algo`'s own has is a ValueError naming the methods that have it)."""
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algo {algo!r}: use one of {', '.join(ALGORITHMS)}")
    own = method_fields(algo)
    for name in given:
        if name not in SHARED_FIELDS and name not in own:
            has = [a for a in ALGORITHMS if name in method_fields(a)]
            raise ValueError(f"--{name.replace('_', '-')} is a setting of --algo {' / '.join(has)}, "
                             f"not of --algo {algo}")
    values = {**preset, **given}
    method = ALGORITHMS[algo].Config(**{k: v for k, v in values.items() if k in own})
    return RLConfig(algo=algo, method=method, **{k: v for k, v in values.items() if k in SHARED_FIELDS})


PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    "smoke": {"steps": 4, "questions_per_step": 4, "plans": 4, "samples_per_plan": 2, "max_new_tokens": 48,
              "train_denoising_steps": 4, "save_every": 2, "eval_questions": 8, "eval_k": (1, 2)},
    # a ~1.5B chat model's checkpoint (the sft preset of the same name) on one GPU: mixed precision,
    # longer texts, a pretrained decoder's learning rates (untested on a GPU yet)
    "qwen2.5-1.5b": {"precision": "bf16", "max_new_tokens": 256, "lr": 1e-5, "text_lr": 1e-6, "save_every": 20,
                     "eval_questions": 200},
}


def all_method_configs() -> list[type]:
    """Every method's config class, once each (two methods may share one), a base before the
    configs built on it."""
    return sorted(dict.fromkeys(cls.Config for cls in ALGORITHMS.values()), key=lambda c: len(c.__mro__))


