"""The latent codec: reasoning text <-> a block of L latent vectors, and the one function that
turns a latent plan into decoder input embeddings.

The encoder reads question + reasoning (through the decoder's own token embeddings, frozen, so it
works for any decoder vocabulary) and emits a VAE posterior over L x d_z latents. The adapter lifts
a latent block into the decoder's embedding space, framed by learned begin/end-of-thought vectors.
Latents are stored normalised (per-dimension mean/std measured on the training set), which is the
space the diffusion policy works in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import seeding


@dataclass(frozen=True)
class CodecConfig:
    latent_tokens: int = 4
    latent_dim: int = 32
    hidden_size: int = 128  # the decoder's (filled in from the decoder)
    enc_dim: int = 128
    enc_layers: int = 2
    enc_heads: int = 4
    max_len: int = 256
    kl_weight: float = 1e-5
    latent_noise: float = 0.1  # extra Gaussian noise on z while training: a robust decoder
    # Against posterior collapse (a decoder that already writes the reasoning from the question
    # alone learns to ignore z): the posterior starts nearly deterministic, so z carries the
    # reasoning from the first step, and a fraction of the reasoning tokens is hidden from the
    # decoder's input while the codec trains, so it must read them from the plan.
    logvar_init: float = -6.0
    cot_dropout: float = 0.5
    # LaDiR's codec: the decoder reads only [bot; adapter(z); eot], never the question, so z must
    # carry the whole reasoning and cannot collapse (cot_dropout is then moot). Every prefix built
    # for such a codec, in training and serving, leaves the prompt out.
    decoder_sees_question: bool = True
    token_substitution: float = 0.0  # share of the encoder's input tokens replaced at random (LaDiR: 0.3)
    # An information budget instead (a conditional VAE whose decoder sees the question): with
    # kl_weight 1 the KL to N(0, I) binds, so a plan drawn from noise decodes like the token model
    # and z carries only what the question leaves open (which solution to write). The first
    # `free_bits` nats of each latent dimension (batch mean) are free, so z is never left unread.
    free_bits: float = 0.0
    # The KL weight ramps from 0 to kl_weight over this share of the codec stage (KL annealing):
    # a decoder that learns to read a nearly deterministic z first keeps reading it once the budget binds.
    kl_warmup: float = 0.0
    # A frame-only codec (the recurrent policy's): a plan is already a block of decoder hidden
    # states (latent_dim = hidden_size), so there is no encoder and the adapter's lift is the
    # identity; only the learned begin/end-of-thought vectors remain.
    frame_only: bool = False


class LatentEncoder(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.hidden_size, cfg.enc_dim)
        self.pos = nn.Parameter(torch.randn(cfg.max_len, cfg.enc_dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(cfg.latent_tokens, cfg.enc_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.enc_dim, cfg.enc_heads, 4 * cfg.enc_dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, cfg.enc_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.enc_dim)
        self.out = nn.Linear(cfg.enc_dim, 2 * cfg.latent_dim)
        with torch.no_grad():
            self.out.bias[cfg.latent_dim:].fill_(cfg.logvar_init)

    def forward(self, token_embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """token_embeds [B, T, hidden], mask [B, T] (True = real token) -> (mu, logvar) [B, L, d_z]."""
        b, t, _ = token_embeds.shape
        if t > self.cfg.max_len:
            raise ValueError(f"codec input of {t} tokens exceeds max_len={self.cfg.max_len}")
        h = self.inp(token_embeds) + self.pos[:t]
        q = self.queries.expand(b, -1, -1)
        keep = torch.cat([torch.ones(b, q.shape[1], dtype=torch.bool, device=mask.device), mask], 1)
        h = self.body(torch.cat([q, h], 1), src_key_padding_mask=~keep)
        mu, logvar = self.out(self.norm(h[:, : q.shape[1]])).chunk(2, dim=-1)
        return mu, logvar.clamp(-12, 6)


class LatentAdapter(nn.Module):
    """z [.., L, d_z] -> [bot; lift(z); eot] [.., L + 2, hidden]."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        if cfg.frame_only and cfg.latent_dim != cfg.hidden_size:
            raise ValueError(f"a frame-only codec passes hidden states through: latent_dim ({cfg.latent_dim}) "
                             f"must equal hidden_size ({cfg.hidden_size})")
        if cfg.frame_only:
            self.lift = nn.Identity()
        else:
            self.lift = nn.Sequential(nn.Linear(cfg.latent_dim, cfg.hidden_size), nn.GELU(),
                                      nn.Linear(cfg.hidden_size, cfg.hidden_size))
        self.bot = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)
        self.eot = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lifted = self.lift(z)
        shape = (*lifted.shape[:-2], 1, lifted.shape[-1])
        return torch.cat([self.bot.expand(shape), lifted, self.eot.expand(shape)], dim=-2)


class LatentCodec(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = None if cfg.frame_only else LatentEncoder(cfg)
        self.adapter = LatentAdapter(cfg)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_dim))
        self.register_buffer("latent_std", torch.ones(cfg.latent_dim))

    def encode(self, token_embeds, mask, sample: bool = True,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (unnormalised) z and the KL to N(0, I) per latent element [B, L, d_z]."""
        if self.encoder is None:
            raise ValueError("a frame-only codec has no encoder: its plans are the decoder's own hidden states")
        mu, logvar = self.encoder(token_embeds, mask)
        if sample:
            noise = seeding.randn(mu.shape, generator, device=mu.device, dtype=mu.dtype)
            z = mu + noise * (0.5 * logvar).exp()
        else:
            z = mu
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)
        return z, kl

    def kl_penalty(self, kl: torch.Tensor, progress: float = 1.0) -> torch.Tensor:
        """The weighted KL term the codec pays at `progress` (0-1) through its training stage:
        per example summed, batch mean, each dimension's first `free_bits` nats free, the weight
        ramping up over the first `kl_warmup` of the stage."""
        per_dim = kl.mean(0)
        if self.cfg.free_bits > 0:
            per_dim = per_dim.clamp_min(self.cfg.free_bits)
        ramp = min(1.0, progress / self.cfg.kl_warmup) if self.cfg.kl_warmup > 0 else 1.0
        return self.cfg.kl_weight * ramp * per_dim.sum()

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean) / self.latent_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std + self.latent_mean

    def plan_embeds(self, z_normalized: torch.Tensor) -> torch.Tensor:
        """A plan in policy space -> the embeddings the decoder reads: [bot; adapter(z); eot]."""
        return self.adapter(self.denormalize(z_normalized))

    def prefixes(self, prompt_embeds: list[torch.Tensor], z_normalized: torch.Tensor) -> list[torch.Tensor]:
        """Each row's decoder prefix for its plan (rows aligned one to one), always as this codec's
        decoder reads it (`decoder_sees_question`): the one plan -> prefix step."""
        return with_plans(prompt_embeds, self.plan_embeds(z_normalized), self.cfg.decoder_sees_question)


def plan_positions(cfg: CodecConfig | None) -> int:
    """How many decoder positions a plan takes: bot, L latents, eot (0 without a codec)."""
    return 0 if cfg is None else cfg.latent_tokens + 2


def with_plans(prompt_embeds: list[torch.Tensor], plan_embeds: torch.Tensor | None,
               sees_question: bool = True) -> list[torch.Tensor]:
    """`[prompt; bot; adapter(z); eot]` per row from embedded prompts and `LatentCodec.plan_embeds`
    rows (aligned one to one); `[bot; adapter(z); eot]` alone for a codec whose decoder does not see
    the question (`CodecConfig.decoder_sees_question`); the prompts alone without plans. Gradients
    flow through both."""
    if plan_embeds is None:
        return list(prompt_embeds)
    if plan_embeds.shape[0] != len(prompt_embeds):
        raise ValueError(f"{plan_embeds.shape[0]} plans for {len(prompt_embeds)} prompts")
    if not sees_question:
        return [p.to(e.dtype) for e, p in zip(prompt_embeds, plan_embeds)]
    return [torch.cat([e, p.to(e.dtype)], dim=0) for e, p in zip(prompt_embeds, plan_embeds)]


def build_inputs_embeds(embed_tokens: nn.Module, prompt_ids: list[list[int]]) -> list[torch.Tensor]:
    """The embedded prompts: B token-id lists -> B tensors [T_b, hidden] (unpadded: the transformers
    backend pads, vLLM takes them as is). Plans join them only through `with_plans` (via
    `Reasoner.prefixes`), which honours a question-free codec."""
    weight = embed_tokens.weight
    return [embed_tokens(torch.as_tensor(ids, dtype=torch.long, device=weight.device)) for ids in prompt_ids]
