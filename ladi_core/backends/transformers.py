"""Decoder backend on plain transformers: batched prefill over left-padded prefix embeddings, the
KV cache repeated n times (the n continuations share their prefix), then a token loop."""
from __future__ import annotations

import torch

from ..decoder import stop_token_ids
from .base import Decoded, SamplingParams, apply_stop


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else temperature + nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TransformersBackend:
    name = "transformers"

    def __init__(self, model, tokenizer, max_batch_seqs: int = 1024):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_seqs = max_batch_seqs
        self.stop_ids = torch.tensor(stop_token_ids(tokenizer))
        self.device = next(model.parameters()).device

    def input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @torch.inference_mode()
    def generate(self, prefixes: list[torch.Tensor], n: int, params: SamplingParams) -> list[list[Decoded]]:
        if n < 1:
            raise ValueError("n must be >= 1")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        per_chunk = max(1, self.max_batch_seqs // n)
        out: list[list[Decoded]] = []
        for start in range(0, len(prefixes), per_chunk):
            out.extend(self._generate_chunk(prefixes[start:start + per_chunk], n, params, generator))
        return out

    def _generate_chunk(self, prefixes, n, params, generator) -> list[list[Decoded]]:
        b, hidden = len(prefixes), prefixes[0].shape[-1]
        t = max(p.shape[0] for p in prefixes)
        dtype = self.model.dtype
        embeds = torch.zeros(b, t, hidden, dtype=dtype, device=self.device)
        mask = torch.zeros(b, t, dtype=torch.long, device=self.device)
        for i, p in enumerate(prefixes):  # left padding: every row ends at the same column
            embeds[i, t - p.shape[0]:] = p.to(device=self.device, dtype=dtype)
            mask[i, t - p.shape[0]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1)
        cache = out.past_key_values
        if n > 1:
            cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].repeat_interleave(n, 0)
        mask = mask.repeat_interleave(n, 0)
        next_pos = pos[:, -1].repeat_interleave(n, 0) + 1
        rows = b * n
        tokens = torch.full((rows, params.max_tokens), self.tokenizer.pad_token_id, dtype=torch.long)
        logps = torch.zeros(rows, params.max_tokens)
        lengths = torch.full((rows,), params.max_tokens, dtype=torch.long)
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)
        stop_ids = self.stop_ids.to(self.device)
        for step in range(params.max_tokens):
            tok = sample_next(logits, params.temperature, params.top_p, generator)
            lp = torch.log_softmax(logits.float(), -1).gather(-1, tok[:, None]).squeeze(-1)
            hit = torch.isin(tok, stop_ids) & ~done
            lengths[hit.cpu()] = step
            tokens[:, step] = tok.cpu()
            logps[:, step] = lp.cpu()
            done |= hit
            if bool(done.all()) or step == params.max_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=self.device)], 1)
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                             past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]
            next_pos = next_pos + 1
        results: list[list[Decoded]] = []
        for i in range(b):
            group = []
            for j in range(n):
                r = i * n + j
                ln = int(lengths[r])
                ids = tokens[r, :ln].tolist()
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                text, stopped = apply_stop(text, params.stop)
                finish = "stop" if (stopped or bool(done[r])) else "length"
                lps = logps[r, : ln + (1 if bool(done[r]) else 0)].tolist()
                group.append(Decoded(text, ids, float(sum(lps)), finish, lps))
            results.append(group)
        return results
