"""Latent policies: what proposes latent plans for a question. Diffusion is the first."""
from .base import LatentPolicy, PlanSample
from .diffusion import DiffusionPolicy, DiffusionPolicyConfig, SamplerConfig

__all__ = ["LatentPolicy", "PlanSample", "DiffusionPolicy", "DiffusionPolicyConfig", "SamplerConfig"]
