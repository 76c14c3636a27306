"""Latent policies: what proposes latent plans for a question. The diffusion prior (LaDiR, LaDi-RL),
DLR's one-pass Gaussian assistant and Coconut's recurrent thinker (the decoder's own hidden
states); `POLICY_KINDS` is the registry a checkpoint's
`policy_kind` names."""
from __future__ import annotations

from .assistant import AssistantPolicy, AssistantPolicyConfig, AssistantSamplerConfig, info_nce
from .base import LatentPolicy, PlanSample, Rescored
from .diffusion import DiffusionPolicy, DiffusionPolicyConfig, SamplerConfig
from .recurrent import OnePlanError, RecurrentPolicy, RecurrentPolicyConfig, RecurrentSamplerConfig

# kind -> (policy class, its architecture config, its sampler config)
POLICY_KINDS: dict[str, tuple[type[LatentPolicy], type, type]] = {
    "diffusion": (DiffusionPolicy, DiffusionPolicyConfig, SamplerConfig),
    "assistant": (AssistantPolicy, AssistantPolicyConfig, AssistantSamplerConfig),
    "recurrent": (RecurrentPolicy, RecurrentPolicyConfig, RecurrentSamplerConfig),
}


def register_policy(cls: type[LatentPolicy], cfg_cls: type, sampler_cls: type) -> None:
    """A new kind, under `cls.kind`: checkpoints naming it load, and every layer serves it."""
    if not issubclass(cls, LatentPolicy):
        raise TypeError(f"{cls.__name__} must subclass LatentPolicy")
    POLICY_KINDS[cls.kind] = (cls, cfg_cls, sampler_cls)


def make_policy(kind: str, cfg: dict, sampler: dict) -> LatentPolicy:
    """A policy of `kind` from its recorded configs (TypeError on fields this LaDi does not know)."""
    if kind not in POLICY_KINDS:
        raise ValueError(f"unknown policy kind {kind!r}: this LaDi knows {', '.join(POLICY_KINDS)}")
    cls, cfg_cls, sampler_cls = POLICY_KINDS[kind]
    return cls(cfg_cls(**cfg), sampler_cls(**sampler))


__all__ = ["LatentPolicy", "PlanSample", "Rescored", "POLICY_KINDS", "register_policy", "make_policy",
           "DiffusionPolicy", "DiffusionPolicyConfig", "SamplerConfig", "AssistantPolicy", "AssistantPolicyConfig",
           "AssistantSamplerConfig", "info_nce", "RecurrentPolicy", "RecurrentPolicyConfig", "RecurrentSamplerConfig",
           "OnePlanError"]
