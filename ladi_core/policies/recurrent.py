"""The recurrent latent policy (Coconut): the decoder thinks in its own hidden states.

The decoder reads `[prompt; bot]`; its last-layer hidden state at the final position becomes the
next input embedding, `latent_tokens` times, with the KV cache reused (n thoughts cost n forward
passes here, and the decode that follows reads them as its prefix). The thoughts are a plan like
any other: the answer is decoded from `[prompt; bot; thoughts; eot]` through the one prefix
builder (`Reasoner.prefixes`, the checkpoint's frame-only codec holding bot and eot), so the vLLM
backend serves it unchanged. The thoughts themselves are computed in torch: vLLM does not hand
back hidden states, so a vLLM-served recurrent checkpoint keeps a torch copy of the decoder.

Thoughts are deterministic: every plan of a question would be the same one. A question therefore
gets one plan and many texts (its diversity is the decoder's sampling after the thoughts), and
asking for more than one plan is refused.

The policy's own weights are latent RL's value head (a linear d -> 1 on a thought), which
predicts whether the answer decoded after the thoughts will be correct.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import LatentPolicy, PlanSample


@dataclass(frozen=True)
class RecurrentPolicyConfig:
    latent_tokens: int = 3  # thoughts per plan: the curriculum's last stage x thoughts_per_step
    latent_dim: int = 128  # = hidden_size: a thought is a decoder hidden state
    hidden_size: int = 128
    thoughts_per_step: int = 1  # Coconut's c: thoughts that replace one reasoning line


@dataclass(frozen=True)
class RecurrentSamplerConfig:
    """Nothing to set: the thoughts are a deterministic function of the question and the decoder."""


class OnePlanError(ValueError):
    """More than one plan asked of a deterministic thinker."""


class RecurrentPolicy(LatentPolicy):
    kind = "recurrent"
    overrides = frozenset()  # no sampler settings: nothing a request may change
    deterministic = True  # every plan of a question is the same: one plan, many texts
    needs_decoder = True  # thinks with the decoder itself (`bind`)

    def __init__(self, cfg: RecurrentPolicyConfig, sampler: RecurrentSamplerConfig | None = None):
        super().__init__()
        if cfg.latent_dim != cfg.hidden_size:
            raise ValueError(f"a thought is a decoder hidden state: latent_dim ({cfg.latent_dim}) must equal "
                             f"hidden_size ({cfg.hidden_size})")
        self.cfg = cfg
        self.sampler = sampler or RecurrentSamplerConfig()
        self.value_head = nn.Linear(cfg.hidden_size, 1)  # latent RL's critic
        self._bound: tuple[nn.Module, nn.Module] | None = None  # (decoder, codec): not submodules, not saved

    # --- the decoder it thinks with ----------------------------------------------------------------
    def bind(self, decoder: nn.Module, codec: nn.Module) -> None:
        """The decoder whose hidden states are the thoughts (trained or served), and the codec whose
        begin-of-thought vector starts them. Held by reference: training updates are seen at once."""
        self._bound = (decoder, codec)

    @property
    def decoder(self) -> nn.Module | None:
        return self._bound[0] if self._bound else None

    def think(self, cond: torch.Tensor, cond_mask: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """`n` (default `latent_tokens`) continuous thoughts per question: [Q, n, hidden]. Gradients
        flow into the decoder when enabled (the curriculum and latent RL train through them).
        cond [Q, T, hidden] right-padded prompt embeddings, cond_mask [Q, T] True = real."""
        if self._bound is None:
            raise RuntimeError("a recurrent policy thinks with its decoder: call bind(decoder, codec) first "
                               "(Reasoner does this)")
        decoder, codec = self._bound
        n = self.cfg.latent_tokens if n is None else n
        q, t, _ = cond.shape
        if n == 0:
            return cond.new_zeros(q, 0, cond.shape[-1])
        body = decoder.base_model  # the transformer under the LM head: last_hidden_state is post-norm
        dtype = next(decoder.parameters()).dtype
        lens = cond_mask.sum(1).tolist()
        bot = codec.adapter.bot.to(dtype)
        # left-pad [prompt; bot] so that every row's newest position is the last one
        rows = [torch.cat([cond.new_zeros(t - n_i, cond.shape[-1]), cond[i, :n_i], bot[None]]).to(dtype)
                for i, n_i in enumerate(lens)]
        x = torch.stack(rows)
        attn = torch.cat([torch.arange(t, device=cond.device)[None] >= (t - cond_mask.sum(1))[:, None],
                          torch.ones(q, 1, dtype=torch.bool, device=cond.device)], 1).long()
        pos = (attn.cumsum(1) - 1).clamp_min(0)
        out = body(inputs_embeds=x, attention_mask=attn, position_ids=pos, use_cache=True)
        h = out.last_hidden_state[:, -1]
        thoughts, cache = [h], out.past_key_values
        for _ in range(n - 1):
            attn = torch.cat([attn, attn.new_ones(q, 1)], 1)
            pos = pos[:, -1:] + 1
            out = body(inputs_embeds=h[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache,
                       use_cache=True)
            h, cache = out.last_hidden_state[:, -1], out.past_key_values
            thoughts.append(h)
        return torch.stack(thoughts, 1)

    def value(self, thoughts: torch.Tensor, detach_head: bool = False) -> torch.Tensor:
        """The value head's logit per thought [.., n]; detach_head: the head's weights are constants
        (latent RL's policy term moves the thoughts, not its critic)."""
        w, b = self.value_head.weight, self.value_head.bias
        if detach_head:
            w, b = w.detach(), b.detach()
        return torch.nn.functional.linear(thoughts, w.to(thoughts.dtype), b.to(thoughts.dtype))[..., 0]

    # --- the policy interface ----------------------------------------------------------------------
    def sample(self, cond: torch.Tensor, cond_mask: torch.Tensor, num_plans: int | list[int], *,
               generator: torch.Generator | None = None, sde: bool = False, init_noise: torch.Tensor | None = None,
               **overrides) -> PlanSample:
        """One plan per question (the thoughts); `generator` and `init_noise` are unused (nothing is
        random). More than one plan per question is refused: they would all be the same."""
        counts = self.plan_counts(cond, num_plans)
        if max(counts) > 1:
            raise OnePlanError("a recurrent policy's thoughts are deterministic, so every plan of a question would "
                               "be the same: ask for one plan and several texts of it")
        settings = self.settings(**overrides)  # none to set: its thoughts are the decoder's hidden states
        return PlanSample(self.think(cond, cond_mask), 1, settings=settings)
