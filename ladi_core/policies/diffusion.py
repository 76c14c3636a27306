"""The diffusion latent policy: a small transformer denoiser that learns p(plan | question) by
rectified flow, and the one sampler that training (SFT loss, RL rollouts) and serving share.

The question enters as the decoder's own prompt embeddings (the same tensors the decoder reads).
It is encoded once per question into per-layer keys and values (`QuestionContext`); the few latent
tokens then cross-attend to them at every denoising step, so M plans x K steps cost M x K passes
over L + 1 tokens, not over the whole question. Classifier-free guidance: during training the
question is hidden with probability `cond_dropout`; a learned null token is always visible, so a
hidden question is well defined.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from .. import flow, seeding
from .base import LatentPolicy, PlanSample, Rescored
from .layers import Block, encode_question


@dataclass(frozen=True)
class DiffusionPolicyConfig:
    latent_tokens: int = 4
    latent_dim: int = 32
    hidden_size: int = 128  # the decoder's embedding width (the condition)
    d_model: int = 128
    layers: int = 4  # denoiser blocks over the latent tokens (self- and cross-attention)
    encoder_layers: int = 2  # question encoder blocks, run once per question
    heads: int = 4
    max_cond_len: int = 256
    cond_dropout: float = 0.1


@dataclass(frozen=True)
class SamplerConfig:
    """Inference defaults; each can be overridden per call (requests, RL)."""

    steps: int = 20
    guidance: float = 1.0  # CFG scale; 1.0 = conditional model only (one forward per step)
    diversity: float = 0.0  # repulsion strength gamma_max; gamma(t) = diversity * t
    repulsion: str = "ladir"  # its kernel: "ladir" (evens the spacing) or "rbf" (only repels): flow.repulsion
    noise_level: float = 0.7  # SDE `a` (Flow-GRPO)
    init_noise_scale: float = 1.0  # LaDiR's released code scales x2-2.5 for unnormalised latents
    shift: float = 1.0  # flow-matching timestep shift


@dataclass
class QuestionContext:
    """A batch of encoded questions: each denoiser block's keys and values over [null; question]."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per block: [B, heads, 1 + T, head_dim] twice
    mask: torch.Tensor  # [B, 1 + T] True = visible; column 0 is the null token

    def repeat(self, counts: torch.Tensor) -> QuestionContext:
        """Row i repeated counts[i] times (one row per plan)."""
        return QuestionContext([(k.repeat_interleave(counts, 0), v.repeat_interleave(counts, 0)) for k, v in self.kv],
                               self.mask.repeat_interleave(counts, 0))

    def hide(self, drop: torch.Tensor) -> QuestionContext:
        """The same context with the question hidden (only the null token visible) where drop is True."""
        mask = self.mask.clone()
        mask[:, 1:] &= ~drop[:, None]
        return QuestionContext(self.kv, mask)

    def cat(self, other: QuestionContext) -> QuestionContext:
        kv = [(torch.cat([k, k2]), torch.cat([v, v2])) for (k, v), (k2, v2) in zip(self.kv, other.kv)]
        return QuestionContext(kv, torch.cat([self.mask, other.mask]))


class Denoiser(nn.Module):
    def __init__(self, cfg: DiffusionPolicyConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.cond_in = nn.Linear(cfg.hidden_size, d)
        self.cond_pos = nn.Parameter(torch.randn(cfg.max_cond_len, d) * 0.02)
        self.null = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.encoder = nn.ModuleList(Block(d, cfg.heads, cross=False) for _ in range(cfg.encoder_layers))
        self.encoder_norm = nn.LayerNorm(d)
        self.x_in = nn.Linear(cfg.latent_dim, d)
        self.latent_pos = nn.Parameter(torch.randn(cfg.latent_tokens, d) * 0.02)
        self.time_proj = Timesteps(d, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_emb = TimestepEmbedding(d, d)
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cross=True) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.latent_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def encode(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> QuestionContext:
        """cond [B, T, hidden], cond_mask [B, T] -> the context every denoising step reuses."""
        b = cond_mask.shape[0]
        h, keep = encode_question(self, cond, cond_mask)
        mem = self.encoder_norm(torch.cat([self.null.expand(b, -1, -1), h], 1))
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=keep.device), keep], 1)
        return QuestionContext([blk.memory(mem) for blk in self.blocks], mask)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, ctx: QuestionContext,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, d_z], sigma [B], ctx for B rows -> velocity [B, L, d_z]."""
        if drop_cond is not None:
            ctx = ctx.hide(drop_cond)
        temb = self.time_emb(self.time_proj(sigma.float() * 1000).to(x.dtype))[:, None]
        h = torch.cat([temb, self.x_in(x) + self.latent_pos], 1)
        for blk, kv in zip(self.blocks, ctx.kv):
            h = blk(h, memory=kv, memory_mask=ctx.mask)
        return self.out(self.norm(h[:, 1:]))


class _ContextArgs(nn.Module):
    """The denoiser with its context as plain tensors, the form `torch.jit.trace` takes."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]],
                mask: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, sigma, QuestionContext(kv, mask))


class DiffusionPolicy(LatentPolicy):
    kind = "diffusion"
    overrides = frozenset(SamplerConfig.__dataclass_fields__)  # what `sample` accepts per call
    request_fields = {"denoising_steps": "steps", "guidance_scale": "guidance", "diversity": "diversity",
                      "repulsion": "repulsion"}

    def __init__(self, cfg: DiffusionPolicyConfig, sampler: SamplerConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.sampler = sampler or SamplerConfig()
        self.denoiser = Denoiser(cfg)
        # not a submodule: the state dict stays the denoiser's own (see `trace_denoiser`)
        object.__setattr__(self, "_traced", None)

    # --- training (SFT) ------------------------------------------------------------------------
    def flow_matching_loss(self, z0: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """Rectified flow: z_t = (1 - t) z0 + t eps, regress v = eps - z0; question dropped for CFG."""
        b = z0.shape[0]
        t = seeding.rand(b, generator, device=z0.device)
        eps = seeding.randn(z0.shape, generator, device=z0.device)
        zt = (1 - t)[:, None, None] * z0 + t[:, None, None] * eps
        drop = seeding.rand(b, generator, device=z0.device) < self.cfg.cond_dropout
        v = self.denoiser(zt, t, self.denoiser.encode(cond, cond_mask), drop)
        return (v - (eps - z0)).pow(2).mean()

    # --- sampling (shared by RL rollouts and serving) -------------------------------------------
    def trace_denoiser(self) -> None:
        """Run the denoiser as one TorchScript graph whenever no gradient is wanted (serving).

        Eager PyTorch takes the GIL back between every op, ~120 per denoiser forward. Beside a
        busy Python thread (a server's event loop) each hand-back can wait out the 5 ms switch
        interval: `python -m benchmarks.denoiser_gil` measured a 6 ms forward at 324 ms beside a
        spinning thread, and the traced one at 58 ms. The graph shares this module's parameters
        and reads any batch size or question length; it keeps the device it was traced on, so
        trace after moving the policy.
        """
        d, w = self.cfg, self.denoiser.null  # example inputs on the policy's device, in its dtype
        with torch.no_grad():
            ctx = self.context(w.new_zeros(2, 3, d.hidden_size), torch.ones(2, 3, dtype=torch.bool, device=w.device))
            x = w.new_zeros(2, d.latent_tokens, d.latent_dim)
            traced = torch.jit.trace(_ContextArgs(self.denoiser), (x, w.new_ones(2), ctx.kv, ctx.mask),
                                     check_trace=False)
        object.__setattr__(self, "_traced", traced)

    def prepare_for_serving(self) -> None:
        """Serving samples through the traced denoiser (`LatentPolicy.prepare_for_serving`)."""
        self.trace_denoiser()

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, ctx: QuestionContext) -> torch.Tensor:
        if self._traced is not None and not torch.is_grad_enabled():
            return self._traced(x, sigma, ctx.kv, ctx.mask)
        return self.denoiser(x, sigma, ctx)

    def context(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> QuestionContext:
        """Encode questions once; `velocity` reuses the result at every step."""
        return self.denoiser.encode(cond, cond_mask)

    def velocity(self, x: torch.Tensor, sigma: float, ctx: QuestionContext, guidance: float) -> torch.Tensor:
        """Guided velocity; with guidance != 1 the conditional and unconditional passes share a batch."""
        s = torch.full((x.shape[0],), float(sigma), device=x.device)
        if guidance == 1.0:
            return self._denoise(x, s, ctx)
        b = x.shape[0]
        hidden = ctx.hide(torch.ones(b, dtype=torch.bool, device=x.device))
        v = self._denoise(torch.cat([x, x]), torch.cat([s, s]), ctx.cat(hidden))
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
        counts = self.plan_counts(cond, num_plans)
        sc = self.settings(**overrides)
        ctx = self.context(cond, cond_mask).repeat(torch.tensor(counts, device=cond.device))
        shape = (sum(counts), self.cfg.latent_tokens, self.cfg.latent_dim)
        if init_noise is None:
            init_noise = seeding.randn(shape, generator, device=cond.device)
        elif tuple(init_noise.shape) != shape:
            raise ValueError(f"init_noise has shape {tuple(init_noise.shape)}, expected {shape}")
        x = init_noise.to(cond.device) * sc.init_noise_scale
        group = counts[0] if len(set(counts)) == 1 else counts
        sigmas = flow.sigma_schedule(sc.steps, sc.shift)
        traj, logps = [x], []
        for i in range(sc.steps):
            x, lp, _, _ = self.step(x, float(sigmas[i]), float(sigmas[i + 1]), ctx, sc, group, sde=sde,
                                    generator=generator)
            if sde:
                logps.append(lp)
                traj.append(x)
        if not sde:
            return PlanSample(x, group, settings=sc)
        return PlanSample(x, group, torch.stack(logps, 1), torch.stack(traj), sigmas, settings=sc)

    def rescore(self, plans: PlanSample, cond: torch.Tensor, cond_mask: torch.Tensor, **overrides) -> Rescored:
        """Log-probability of each stored transition: [rows, steps], with each step's mean and std.

        Each transition goes through the sampler's own `step` with the settings that drew the plans
        (`plans.settings`); `overrides` (guidance, diversity, noise_level) replace them."""
        sc = self.settings(plans.settings, **overrides)
        counts = self.plan_counts(cond, plans.group_size)
        ctx = self.context(cond, cond_mask).repeat(torch.tensor(counts, device=cond.device))
        sig, traj = plans.sigmas, plans.trajectory
        logps, means, stds = [], [], []
        for k in range(len(sig) - 1):
            _, lp, mean, std = self.step(traj[k], float(sig[k]), float(sig[k + 1]), ctx, sc, plans.group_size,
                                         sde=True, x_next=traj[k + 1])
            logps.append(lp)
            means.append(mean)
            stds.append(std)
        return Rescored(torch.stack(logps, 1), means, stds)

    def step(self, x: torch.Tensor, sigma: float, sigma_next: float, ctx: QuestionContext, sc: SamplerConfig,
             group: int | list[int], *, sde: bool, generator: torch.Generator | None = None,
             x_next: torch.Tensor | None = None):
        """THE denoising step, for sampling and for RL's re-scoring alike: guided velocity, repulsion
        between a question's plans, then the ODE move or the SDE (Flow-GRPO) transition.

        Returns (x_next, log_prob, mean, std); the last three are None for the ODE. With `x_next`
        given (re-scoring a stored transition) the SDE step only evaluates its log-density."""
        v = self.velocity(x, sigma, ctx, sc.guidance)
        if sc.diversity:
            # v points towards noise and dt < 0: subtracting g moves the plans apart.
            v = v - sc.diversity * sigma * flow.repulsion(x, group, sc.repulsion)
        if not sde:
            return flow.ode_step(x, v, sigma, sigma_next), None, None, None
        return flow.sde_step(x, v, sigma, sigma_next, sc.noise_level, generator, x_next)
