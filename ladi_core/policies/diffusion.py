"""The diffusion latent policy: a small transformer denoiser that learns p(plan | question) by
rectified flow, and the one sampler that training (SFT loss, RL rollouts) and serving share.

The question enters as the decoder's own prompt embeddings (the same tensors the decoder reads),
projected and attended to by the latent tokens. Classifier-free guidance: during training the
question is hidden with probability `cond_dropout`; a learned null token is always present so a
hidden question is well defined.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from .. import flow
from .base import PlanSample


@dataclass(frozen=True)
class DiffusionPolicyConfig:
    latent_tokens: int = 4
    latent_dim: int = 32
    hidden_size: int = 128  # the decoder's embedding width (the condition)
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    max_cond_len: int = 256
    cond_dropout: float = 0.1


@dataclass(frozen=True)
class SamplerConfig:
    """Inference defaults; each can be overridden per call (requests, RL)."""

    steps: int = 20
    guidance: float = 1.0  # CFG scale; 1.0 = conditional model only (one forward per step)
    diversity: float = 0.0  # repulsion strength gamma_max; gamma(t) = diversity * t
    noise_level: float = 0.7  # SDE `a` (Flow-GRPO)
    init_noise_scale: float = 1.0  # LaDiR's released code scales x2-2.5 for unnormalised latents
    shift: float = 1.0  # flow-matching timestep shift


class Denoiser(nn.Module):
    def __init__(self, cfg: DiffusionPolicyConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.x_in = nn.Linear(cfg.latent_dim, d)
        self.cond_in = nn.Linear(cfg.hidden_size, d)
        self.time_proj = Timesteps(d, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_emb = TimestepEmbedding(d, d)
        self.null = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.latent_pos = nn.Parameter(torch.randn(cfg.latent_tokens, d) * 0.02)
        self.cond_pos = nn.Parameter(torch.randn(cfg.max_cond_len, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.latent_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, d_z], sigma [B], cond [B, T, hidden], cond_mask [B, T] -> velocity [B, L, d_z]."""
        b, t = cond_mask.shape
        if t > self.cfg.max_cond_len:
            raise ValueError(f"question of {t} tokens exceeds the policy's max_cond_len={self.cfg.max_cond_len}")
        temb = self.time_emb(self.time_proj(sigma.float() * 1000).to(x.dtype))[:, None]
        c = self.cond_in(cond.to(x.dtype)) + self.cond_pos[:t]
        keep = cond_mask.bool()
        if drop_cond is not None:
            keep = keep & ~drop_cond[:, None]
        lat = self.x_in(x) + self.latent_pos
        seq = torch.cat([temb, self.null.expand(b, -1, -1), c, lat], dim=1)
        always = torch.ones(b, 2, dtype=torch.bool, device=x.device)
        lat_keep = torch.ones(b, lat.shape[1], dtype=torch.bool, device=x.device)
        h = self.body(seq, src_key_padding_mask=~torch.cat([always, keep, lat_keep], 1))
        return self.out(self.norm(h[:, -lat.shape[1]:]))


class DiffusionPolicy(nn.Module):
    def __init__(self, cfg: DiffusionPolicyConfig, sampler: SamplerConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.sampler = sampler or SamplerConfig()
        self.denoiser = Denoiser(cfg)

    # --- training (SFT) ------------------------------------------------------------------------
    def flow_matching_loss(self, z0: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """Rectified flow: z_t = (1 - t) z0 + t eps, regress v = eps - z0; question dropped for CFG."""
        b = z0.shape[0]
        t = torch.rand(b, generator=generator, device=z0.device)
        eps = torch.randn(z0.shape, generator=generator, device=z0.device)
        zt = (1 - t)[:, None, None] * z0 + t[:, None, None] * eps
        drop = torch.rand(b, generator=generator, device=z0.device) < self.cfg.cond_dropout
        v = self.denoiser(zt, t, cond, cond_mask, drop)
        return (v - (eps - z0)).pow(2).mean()

    # --- sampling (shared by RL rollouts and serving) -------------------------------------------
    def velocity(self, x: torch.Tensor, sigma: float, cond: torch.Tensor, cond_mask: torch.Tensor,
                 guidance: float) -> torch.Tensor:
        """Guided velocity; with guidance != 1 the conditional and unconditional passes share a batch."""
        s = torch.full((x.shape[0],), float(sigma), device=x.device)
        if guidance == 1.0:
            return self.denoiser(x, s, cond, cond_mask)
        b = x.shape[0]
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        v = self.denoiser(torch.cat([x, x]), torch.cat([s, s]), torch.cat([cond, cond]),
                          torch.cat([cond_mask, cond_mask]), drop)
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    def sample(self, cond: torch.Tensor, cond_mask: torch.Tensor, num_plans: int | list[int], *,
               generator: torch.Generator | None = None, sde: bool = False, init_noise: torch.Tensor | None = None,
               **overrides) -> PlanSample:
        """`num_plans` plans per question (one count for all, or one per question), denoised as one batch.

        sde=False: Euler ODE. sde=True: Flow-GRPO steps; keeps the trajectory and log-probs.
        init_noise: the starting point x_1 per plan row (a server draws it from each request's seed).
        overrides: any SamplerConfig field (steps, guidance, diversity, noise_level, ...).
        """
        counts = [num_plans] * cond.shape[0] if isinstance(num_plans, int) else list(num_plans)
        if len(counts) != cond.shape[0] or min(counts) < 1:
            raise ValueError(f"need one plan count >= 1 per question, got {num_plans}")
        sc = replace(self.sampler, **{k: v for k, v in overrides.items() if v is not None})
        reps = torch.tensor(counts, device=cond.device)
        cond = cond.repeat_interleave(reps, 0)
        cond_mask = cond_mask.repeat_interleave(reps, 0)
        shape = (cond.shape[0], self.cfg.latent_tokens, self.cfg.latent_dim)
        if init_noise is None:
            init_noise = torch.randn(shape, generator=generator, device=cond.device)
        elif tuple(init_noise.shape) != shape:
            raise ValueError(f"init_noise has shape {tuple(init_noise.shape)}, expected {shape}")
        x = init_noise.to(cond.device) * sc.init_noise_scale
        group = counts[0] if len(set(counts)) == 1 else counts
        sigmas = flow.sigma_schedule(sc.steps, sc.shift)
        traj, logps = [x], []
        for i in range(sc.steps):
            sig, nxt = float(sigmas[i]), float(sigmas[i + 1])
            v = self.velocity(x, sig, cond, cond_mask, sc.guidance)
            if sc.diversity:
                # v points towards noise and dt < 0: subtracting g moves the plans apart.
                v = v - sc.diversity * sig * flow.repulsion(x, group)
            if sde:
                x, lp, _, _ = flow.sde_step(x, v, sig, nxt, sc.noise_level, generator)
                logps.append(lp)
                traj.append(x)
            else:
                x = flow.ode_step(x, v, sig, nxt)
        if not sde:
            return PlanSample(x, group)
        return PlanSample(x, group, torch.stack(logps, 1), torch.stack(traj), sigmas)
