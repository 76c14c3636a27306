"""Decoder backend on plain transformers: batched prefill over left-padded prefix embeddings, the
KV cache repeated n times (the n continuations share their prefix), then a token loop.

Each prefix may carry its own SamplingParams (temperature, top_p, max_tokens, seed, penalties,
biases, top-k, min-p, ignore_eos, top log-probs), so requests that arrive together decode in one
batch; a seeded prefix draws from its own generator, so its samples do not depend on what it was
batched with. An optional observer sees every step's tokens
(streaming) and may abort rows (a client gone, a stop string reached).
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

import torch

from ..decoder import stop_token_ids
from .base import Decoded, SamplingParams, StepObserver, apply_stop, finished, per_prefix_requests


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                generators: list[tuple[slice, torch.Generator | None]], top_k: torch.Tensor | None = None,
                min_p: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row. temperature/top_p/top_k/min_p: [rows]; rows at temperature 0 are greedy.
    generators: row ranges and the generator each range draws from. Filters in vLLM's order:
    top-k, then top-p, then min-p, on the temperature-scaled distribution."""
    greedy = logits.argmax(-1)
    temp = temperature.clamp_min(1e-5)[:, None]
    probs = torch.softmax(logits.float() / temp, -1)
    if top_k is not None and bool((top_k > 0).any()):
        kth = probs.topk(int(top_k.max()), -1).values.gather(1, (top_k.clamp_min(1) - 1)[:, None])
        probs = probs.masked_fill((probs < kth) & (top_k > 0)[:, None], 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if bool((top_p < 1.0).any()):
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p[:, None]  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
    if min_p is not None and bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, 0.0)
    out = torch.empty_like(greedy)
    for rows, gen in generators:
        out[rows] = torch.multinomial(probs[rows], 1, generator=gen).squeeze(-1)
    return torch.where(temperature == 0, greedy, out)


class LogitShaper:
    """vLLM's logit processing for a batch of rows, each with its own settings: `logit_bias` added,
    then the penalties on the tokens each row has generated so far (presence once, frequency per
    occurrence, repetition dividing a positive logit and multiplying a negative one). The prompt
    arrives as embeddings, so only generated tokens count towards the penalties."""

    def __init__(self, params: list[SamplingParams], reps: torch.Tensor, vocab: int, device):
        def per_row(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device).repeat_interleave(reps)

        rows = int(reps.sum())
        self.presence = per_row([p.presence_penalty for p in params])[:, None]
        self.frequency = per_row([p.frequency_penalty for p in params])[:, None]
        self.repetition = per_row([p.repetition_penalty for p in params])[:, None]
        self.top_k = per_row([p.top_k for p in params], torch.long)
        self.min_p = per_row([p.min_p for p in params])
        bias = torch.zeros(len(params), vocab, device=device)
        for i, p in enumerate(params):
            for tok, b in p.logit_bias:
                bias[i, tok] += b
        self.bias = bias.repeat_interleave(reps, 0)
        self.counts = torch.zeros(rows, vocab, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits.float() + self.bias
        seen = self.counts > 0
        x = torch.where(seen, torch.where(x > 0, x / self.repetition, x * self.repetition), x)
        return x - self.frequency * self.counts - self.presence * seen.float()

    def update(self, tokens: torch.Tensor) -> None:
        self.counts[torch.arange(tokens.shape[0], device=tokens.device), tokens] += 1


class TransformersBackend:
    name = "transformers"
    continuous_batching = False  # a call owns the model until it returns
    unsupported = {"json_schema": "structured outputs need a grammar engine, which only the vllm backend has"}

    def __init__(self, model, tokenizer, max_batch_seqs: int = 1024):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_seqs = max_batch_seqs
        self.device = next(model.parameters()).device
        self.stop_ids = torch.tensor(stop_token_ids(tokenizer), device=self.device)

    def input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def trainable_decoder(self) -> torch.nn.Module:
        return self.model

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """New decoder weights (a rollout copy following a sharded decoder that trains)."""
        self.model.load_state_dict(state_dict)

    def dead(self) -> str | None:
        return None  # the model lives in this process: it dies with it

    @property
    def max_model_len(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @torch.inference_mode()
    def generate(self, prefixes: list[torch.Tensor], n: int | Sequence[int],
                 params: SamplingParams | Sequence[SamplingParams],
                 observer: StepObserver | None = None) -> list[list[Decoded]]:
        if not prefixes:
            return []
        counts, per_prefix = per_prefix_requests(len(prefixes), n, params)
        # one generator per seeded prefix, from its own seed (seeding.py): a prefix's texts do not
        # depend on which others share the call
        gens = [None if p.seed is None else torch.Generator(device=self.device).manual_seed(p.seed)
                for p in per_prefix]
        out: list[list[Decoded]] = []
        start, row = 0, 0
        while start < len(prefixes):
            end, rows = start + 1, counts[start]
            while end < len(prefixes) and rows + counts[end] <= self.max_batch_seqs:
                rows += counts[end]
                end += 1
            out.extend(self._generate_chunk(prefixes[start:end], counts[start:end], per_prefix[start:end],
                                            gens[start:end], observer, row))
            start, row = end, row + rows
        return out

    def submit(self, prefixes: list[torch.Tensor], n: int | Sequence[int],
               params: SamplingParams | Sequence[SamplingParams],
               observer: StepObserver | None = None) -> list[Future[list[Decoded]]]:
        """Decodes in the caller (the call owns the model) and returns finished futures."""
        return finished(self.generate(prefixes, n, params, observer))

    def _generate_chunk(self, prefixes, counts, params, gens, observer, row_offset) -> list[list[Decoded]]:
        b, hidden = len(prefixes), prefixes[0].shape[-1]
        t = max(p.shape[0] for p in prefixes)
        dtype, dev = self.model.dtype, self.device
        embeds = torch.zeros(b, t, hidden, dtype=dtype, device=dev)
        mask = torch.zeros(b, t, dtype=torch.long, device=dev)
        for i, p in enumerate(prefixes):  # left padding: every row ends at the same column
            embeds[i, t - p.shape[0]:] = p.to(device=dev, dtype=dtype)
            mask[i, t - p.shape[0]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1)
        # the continuations of a prefix share its KV cache: repeat each prefix's cache rows
        reps = torch.tensor(counts, device=dev)
        cache = out.past_key_values
        if int(reps.max()) > 1:
            cache.batch_select_indices(torch.arange(b, device=dev).repeat_interleave(reps))
        logits = out.logits[:, -1].repeat_interleave(reps, 0)
        mask = mask.repeat_interleave(reps, 0)
        next_pos = pos[:, -1].repeat_interleave(reps, 0) + 1

        rows = int(reps.sum())
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        temperature = torch.tensor([p.temperature for p in params], device=dev).repeat_interleave(reps)
        top_p = torch.tensor([p.top_p for p in params], device=dev).repeat_interleave(reps)
        limit = torch.tensor([p.max_tokens for p in params], device=dev).repeat_interleave(reps)
        min_tokens = torch.tensor([p.min_tokens for p in params], device=dev).repeat_interleave(reps)
        ignore_eos = torch.tensor([p.ignore_eos for p in params], device=dev).repeat_interleave(reps)
        shaper = LogitShaper(params, reps, logits.shape[-1], dev) if any(p.shapes_logits for p in params) else None
        k_top = max(p.top_logprobs for p in params)
        is_stop = torch.isin(torch.arange(logits.shape[-1], device=dev), self.stop_ids)  # [vocab]
        # each prefix's rows draw from its own generator; unseeded prefixes in a run draw together
        # from the global one (rows are prefix-major)
        groups: list[tuple[slice, torch.Generator | None]] = []
        for i, gen in enumerate(gens):
            if groups and gen is None and groups[-1][1] is None:
                groups[-1] = (slice(groups[-1][0].start, offsets[i + 1]), None)
            else:
                groups.append((slice(offsets[i], offsets[i + 1]), gen))

        max_steps = int(limit.max())
        tokens = torch.full((rows, max_steps), self.tokenizer.pad_token_id, dtype=torch.long)
        logps = torch.zeros(rows, max_steps)
        tops = (torch.zeros(rows, max_steps, k_top, dtype=torch.long), torch.zeros(rows, max_steps, k_top)) \
            if k_top else None
        lengths = limit.clone().cpu()
        stopped = torch.zeros(rows, dtype=torch.bool, device=dev)  # ended by a stop token
        aborted = torch.zeros(rows, dtype=torch.bool, device=dev)
        done = torch.zeros(rows, dtype=torch.bool, device=dev)
        for step in range(max_steps):
            # log-probs are the model's own (vLLM's raw_logprobs), before any shaping or masking
            raw = torch.log_softmax(logits.float(), -1)
            if shaper is not None:
                logits = shaper(logits)
            early = min_tokens > step  # rows whose stop tokens are masked until min_tokens
            if bool(early.any()):
                logits = logits.masked_fill(early[:, None] & is_stop, float("-inf"))
            tok = sample_next(logits, temperature, top_p, groups, *((shaper.top_k, shaper.min_p) if shaper else ()))
            lp = raw.gather(-1, tok[:, None]).squeeze(-1)
            if tops is not None:
                vals, idx = raw.topk(k_top, -1)
                tops[0][:, step], tops[1][:, step] = idx.cpu(), vals.cpu()
            if shaper is not None:
                shaper.update(tok)
            hit = torch.isin(tok, self.stop_ids) & ~done & ~ignore_eos
            lengths[hit.cpu()] = step
            stopped |= hit
            tokens[:, step] = tok.cpu()
            logps[:, step] = lp.cpu()
            done |= hit
            if observer is not None:
                abort = observer.on_step(row_offset, tok.tolist(), done.tolist())
                if abort is not None:
                    newly = torch.tensor(abort, device=dev) & ~done
                    lengths[newly.cpu()] = step + 1
                    aborted |= newly
                    done |= newly
            done |= (step + 1) >= limit
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=dev)], 1)
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                             past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]
            next_pos = next_pos + 1

        results: list[list[Decoded]] = []
        for i, p in enumerate(params):
            group = []
            for r in range(offsets[i], offsets[i + 1]):
                ln = int(lengths[r])
                ids = tokens[r, :ln].tolist()
                text, cut = apply_stop(self.tokenizer.decode(ids, skip_special_tokens=True), p.stop)
                finish = "stop" if (cut or bool(stopped[r])) else "abort" if bool(aborted[r]) else "length"
                lps = logps[r, : ln + int(bool(stopped[r]))].tolist()
                top = None
                if p.top_logprobs:
                    top = [list(zip(tops[0][r, t, :p.top_logprobs].tolist(), tops[1][r, t, :p.top_logprobs].tolist()))
                           for t in range(ln)]
                group.append(Decoded(text, ids, float(sum(lps)), finish, lps, top))
            results.append(group)
        return results
