"""The decoder-backend interface: prefix embeddings in, sampled texts out.

A backend knows nothing of plans, policies or tasks; it decodes N continuations of each prefix
(the N share the prefix's KV cache). transformers and vLLM implement it.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..seeding import row_params


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = True  # False: a backend may skip them (vLLM computes them only when asked)
    min_tokens: int = 0  # stop tokens cannot end a text before this many tokens (vLLM's min_tokens)
    # the rest as vLLM's own SamplingParams means them; penalties and biases act on the logits
    # before temperature, then top-k / top-p / min-p filter the distribution
    top_k: int = 0  # keep the k most likely tokens (0: all)
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability
    presence_penalty: float = 0.0  # subtracted once from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted per occurrence so far
    repetition_penalty: float = 1.0  # a generated token's logit divided by it (> 0) or multiplied (< 0)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits
    ignore_eos: bool = False  # stop tokens do not end the text: it runs to max_tokens
    top_logprobs: int = 0  # alternatives returned per token (needs logprobs)
    json_schema: str | None = None  # structured output: the text must match this JSON schema (JSON text)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if self.top_k < 0 or not 0.0 <= self.min_p <= 1.0 or self.repetition_penalty <= 0 or self.top_logprobs < 0:
            raise ValueError("need top_k >= 0, min_p in [0, 1], repetition_penalty > 0 and top_logprobs >= 0")

    @property
    def shapes_logits(self) -> bool:
        """Whether anything but temperature / top-p acts on the logits (the slow path in torch)."""
        return bool(self.top_k or self.min_p or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.logit_bias)


class BackendDead(RuntimeError):
    """The backend can never decode again (its engine process died): callers stop sending work and
    a server exits so that its supervisor restarts it."""


@dataclass
class Decoded:
    """One sampled continuation. logprob: sum of the model's (temperature-1) token log-probs; None
    when the sampling parameters did not ask for them and the backend skipped them."""

    text: str
    token_ids: list[int]
    logprob: float | None
    finish_reason: str  # "stop" | "length" | "abort"
    token_logprobs: list[float] = field(default_factory=list)
    # per returned token, its `top_logprobs` most likely alternatives (id, log-prob), best first
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def mean_logprob(self) -> float | None:
        return None if self.logprob is None else self.logprob / max(1, len(self.token_ids))


class StepObserver(Protocol):
    """Sees each decoding step: streaming, cancellation and stop strings live here, not in backends."""

    def watches(self, row: int) -> bool:
        """Whether `row` needs its tokens step by step (streaming, stop strings). A backend may
        report an unwatched row only when it finishes: vLLM then sends one final output per
        request instead of one per token, as its own server does for non-streaming requests."""
        ...

    def on_step(self, row_offset: int, tokens: list[int], done: list[bool]) -> list[bool] | None:
        """tokens/done for rows row_offset.. (row = prefix * n + j). Returns rows to abort, or None.

        Plain lists, not tensors: vLLM reports a token at a time, and a tensor per token cost the
        output thread a third of its time."""
        ...


class DecoderBackend(Protocol):
    name: str
    continuous_batching: bool  # True: concurrent submit()/generate() calls are batched together by the backend
    max_model_len: int | None  # the longest prefix + continuation it decodes (None: unknown)
    # SamplingParams fields it cannot honour -> why (a request that sets one gets a 400 saying so)
    unsupported: dict[str, str]

    def input_embeddings(self) -> torch.nn.Module | None:
        """The decoder's token-embedding module when it lives in this process (shared, not copied)."""
        ...

    def trainable_decoder(self) -> torch.nn.Module | None:
        """The decoder module that training updates in place, when it lives in this process (None
        for an engine that holds its own copy of the weights and takes them by `update_weights`)."""
        ...

    def dead(self) -> str | None:
        """Why this backend can no longer decode (its engine died), or None while it can."""
        ...

    def generate(self, prefixes: list[torch.Tensor], n: int, params: SamplingParams | Sequence[SamplingParams],
                 observer: StepObserver | None = None) -> list[list[Decoded]]:
        """n continuations for each prefix [T_i, hidden]; result[i][j] is continuation j of prefix i.
        params: one for all prefixes, or one per prefix (requests batched together)."""
        ...

    def submit(self, prefixes: list[torch.Tensor], n: int, params: SamplingParams | Sequence[SamplingParams],
               observer: StepObserver | None = None) -> list[Future[list[Decoded]]]:
        """generate(), one future per prefix: a continuous-batching backend returns at once and each
        future completes when its prefix's texts do (a request need not wait for its batch-mates);
        the others decode in the caller and return finished futures. Cancelling a future aborts
        its prefix's decoding (rows the observer does not watch are aborted no other way)."""
        ...


def finished(results: list[list[Decoded]]) -> list[Future[list[Decoded]]]:
    """Results already in hand as completed futures (`submit` of a backend that decodes in the caller)."""
    futures = []
    for r in results:
        f: Future[list[Decoded]] = Future()
        f.set_result(r)
        futures.append(f)
    return futures


def per_prefix_requests(num_prefixes: int, n: int | Sequence[int], params: SamplingParams | Sequence[SamplingParams],
                        ) -> tuple[list[int], list[SamplingParams]]:
    """A backend call's arguments as one sample count and one SamplingParams per prefix, checked.
    One SamplingParams for every prefix is spread by the seeding rule (`seeding.row_params`); a list
    is taken as given: each prefix's texts are seeded by its own entry's seed alone."""
    counts = [n] * num_prefixes if isinstance(n, int) else list(n)
    if len(counts) != num_prefixes:
        raise ValueError(f"{num_prefixes} prefixes need as many counts")
    if min(counts, default=1) < 1:
        raise ValueError("n must be >= 1")
    per_prefix = list(params) if isinstance(params, Sequence) else row_params(params, counts)
    if len(per_prefix) != num_prefixes:
        raise ValueError(f"{num_prefixes} prefixes need as many SamplingParams")
    return counts, per_prefix


def apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut `text` at the first stop string, OpenAI-style (the stop string is not returned)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
