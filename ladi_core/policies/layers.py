"""Layers the latent policies share: a pre-norm transformer block (self-attention, optional
cross-attention to a memory, MLP) and the question encoder over the decoder's prompt embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention to a context, MLP."""

    def __init__(self, d: int, heads: int, cross: bool):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        if cross:
            self.norm2, self.q, self.kv = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, 2 * d)
            self.cross_proj = nn.Linear(d, d)
        self.norm3 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:
        b, h, t, dh = x.shape
        return x.transpose(1, 2).reshape(b, t, h * dh)

    def memory(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(ctx).chunk(2, -1)
        return self._heads(k), self._heads(v)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None,
                memory: tuple[torch.Tensor, torch.Tensor] | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask / memory_mask: [B, keys] True = visible."""
        q, k, v = (self._heads(t) for t in self.qkv(self.norm1(h)).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
        h = h + self.proj(self._merge(a))
        if memory is not None:
            q = self._heads(self.q(self.norm2(h)))
            a = F.scaled_dot_product_attention(q, *memory, attn_mask=memory_mask[:, None, None, :])
            h = h + self.cross_proj(self._merge(a))
        return h + self.mlp(self.norm3(h))


def encode_question(module: nn.Module, cond: torch.Tensor, cond_mask: torch.Tensor) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """The question encoder every latent policy here shares, over the decoder's prompt embeddings:
    `module.cond_in` + `cond_pos`, then its `encoder` blocks. Returns (hidden [B, T, d], keep [B, T])."""
    t = cond_mask.shape[1]
    if t > module.cfg.max_cond_len:
        raise ValueError(f"question of {t} tokens exceeds the policy's max_cond_len={module.cfg.max_cond_len}")
    keep = cond_mask.bool()
    h = module.cond_in(cond.to(module.cond_pos.dtype)) + module.cond_pos[:t]
    for blk in module.encoder:
        h = blk(h, keep)
    return h, keep
