"""Question -> M latent plans -> N texts per plan: the path training, evaluation and serving walk.

    prompt ids ─► embed ─► policy.sample (M plans, one batch) ─► codec.plan_embeds
               └──────────────────────────────────► with_plans (Reasoner.rows: seeds) ─► backend.generate (N each)
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .backends import Decoded, DecoderBackend, SamplingParams, StepObserver, TransformersBackend
from .checkpoint import Checkpoint, load_checkpoint
from .codec import build_inputs_embeds, plan_positions
from .decoder import chat_prompt, load_decoder
from .policies import PlanSample
from .seeding import plan_noise, question_seed, row_params


@dataclass
class Completion:
    """One text and the plan it came from: what generation, evaluation and the server's modes share."""

    text: str
    plan_index: int | None  # which latent plan of its question (None for token-level checkpoints)
    decoded: Decoded

    @property
    def finish_reason(self) -> str:
        return self.decoded.finish_reason


@dataclass
class Generation:
    """Everything one call produced for one question."""

    completions: list[Completion]  # plan-major: plan 0's N texts, then plan 1's, ...
    plans: torch.Tensor | None  # [M, L, d_z] normalised latents, None for token-level


@dataclass
class Rows:
    """Questions laid out for the decoder: one row per (question, plan), plan-major within a question."""

    embeds: list[torch.Tensor]  # each row's prompt embeddings
    plans: torch.Tensor | None  # [rows, L, d_z] each row's plan, None for a token-level checkpoint
    counts: list[int]  # texts per row
    params: list[SamplingParams]  # each row's own sampling stream (seeding.py)
    question: list[int]  # which question each row belongs to
    plan_index: list[int | None]  # the row's plan within its question (None: token-level)

    def completions(self, decoded: list[list[Decoded]]) -> list[list[Completion]]:
        """The decoded texts regrouped per question, plan-major."""
        out: list[list[Completion]] = [[] for _ in range(max(self.question, default=-1) + 1)]
        for q, m, texts in zip(self.question, self.plan_index, decoded):
            out[q].extend(Completion(d.text, m, d) for d in texts)
        return out


def pad_embeds(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of [T_i, H] into [B, T, H] and a mask (True = real)."""
    t = max(e.shape[0] for e in embeds)
    out = embeds[0].new_zeros(len(embeds), t, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), t, dtype=torch.bool, device=embeds[0].device)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return out, mask


class Reasoner:
    """A checkpoint bound to a decoder backend."""

    def __init__(self, checkpoint: Checkpoint, backend: DecoderBackend, embed_tokens: torch.nn.Module | None = None):
        self.checkpoint = checkpoint
        self.backend = backend
        self.tokenizer = checkpoint.tokenizer
        self.embed_tokens = embed_tokens or backend.input_embeddings()
        if self.embed_tokens is None:
            raise ValueError(f"backend {backend.name} keeps no embeddings in-process: pass embed_tokens")
        policy = checkpoint.policy
        if policy is not None and policy.needs_decoder and policy.decoder is None:
            # a policy that thinks with the decoder: the backend's own module, or (vLLM keeps its
            # weights in its engine) a torch copy of the same weights
            thinker = backend.trainable_decoder() or load_decoder(checkpoint.decoder_dir)[0]
            policy.bind(thinker, checkpoint.codec)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", backend: str = "transformers",
                        **backend_kw) -> Reasoner:
        """backend "transformers" (kw: max_batch_seqs) or "vllm" (kw: options=VLLMOptions(...))."""
        ckpt = load_checkpoint(path, device)
        if backend == "vllm":
            from .backends.vllm import VLLMBackend  # imports vllm: only when asked for

            return cls(ckpt, VLLMBackend(ckpt.decoder_dir, ckpt.tokenizer, **backend_kw))
        if backend != "transformers":
            raise ValueError(f"unknown backend {backend!r}: use 'transformers' or 'vllm'")
        model, _ = load_decoder(ckpt.decoder_dir, device=device)
        return cls(ckpt, TransformersBackend(model, ckpt.tokenizer, **backend_kw))

    @property
    def is_latent(self) -> bool:
        return self.checkpoint.is_latent

    @property
    def distinct_plans(self) -> bool:
        """Whether a question's plans differ from one another. False for a token-level checkpoint and
        for a deterministic thinker (the recurrent policy), which gets one plan and many texts."""
        return self.is_latent and not self.checkpoint.policy.deterministic

    def without_plans(self) -> Reasoner:
        """The same decoder on the same backend, prompted with no plan: the decoder's own
        token-level behaviour (what a frozen-decoder method such as DLR must leave unchanged)."""
        ck = self.checkpoint
        token_view = replace(ck, config=ck.config.model_copy(update={"kind": "token"}), codec=None, policy=None)
        return Reasoner(token_view, self.backend, self.embed_tokens)

    def prompt_ids(self, prompts: list[str], chat: bool = True) -> list[list[int]]:
        texts = [chat_prompt(self.tokenizer, p) if chat else p for p in prompts]
        return [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]

    @torch.no_grad()
    def prompt_embeds(self, prompt_ids: list[list[int]]) -> list[torch.Tensor]:
        return build_inputs_embeds(self.embed_tokens, prompt_ids)

    def sample_plans(self, prompt_embeds: list[torch.Tensor], num_plans: int | list[int], *,
                     generator: torch.Generator | None = None, sde: bool = False,
                     init_noise: torch.Tensor | None = None, **overrides) -> PlanSample:
        """M plans for each question, all denoised as one batch (grad flows when RL asks for it)."""
        cond, mask = pad_embeds(prompt_embeds)
        return self.checkpoint.policy.sample(cond, mask, num_plans, generator=generator, sde=sde,
                                             init_noise=init_noise, **overrides)

    @torch.no_grad()
    def decode(self, prompt_embeds: list[torch.Tensor], plans: torch.Tensor | None, samples_per_plan: int | list[int],
               params: SamplingParams | list[SamplingParams], observer: StepObserver | None = None,
               ) -> list[list[Decoded]]:
        """N texts for each (prompt, plan) row; plans [B, L, d_z] aligned with the rows, or None."""
        return self.backend.generate(self.prefixes(prompt_embeds, plans), samples_per_plan, params, observer)

    @torch.no_grad()
    def submit_decode(self, prompt_embeds: list[torch.Tensor], plans: torch.Tensor | None,
                      samples_per_plan: int | list[int], params: SamplingParams | list[SamplingParams],
                      observer: StepObserver | None = None) -> list[Future[list[Decoded]]]:
        """`decode` with one future per row, each done when its texts are (see `DecoderBackend.submit`)."""
        return self.backend.submit(self.prefixes(prompt_embeds, plans), samples_per_plan, params, observer)

    def prefixes(self, prompt_embeds: list[torch.Tensor], plans: torch.Tensor | None) -> list[torch.Tensor]:
        """The decoder's input per row: the prompt, then the plan's [bot; adapter(z); eot] when there is one."""
        if plans is None:
            return list(prompt_embeds)
        return self.checkpoint.codec.prefixes(prompt_embeds, plans)

    @property
    def plan_positions(self) -> int:
        """Decoder positions a plan adds to every prefix (0 for a token-level checkpoint)."""
        return plan_positions(self.checkpoint.codec.cfg if self.is_latent else None)

    def plan_noise(self, seeds: list[int | None], plans: list[int]) -> torch.Tensor:
        """Each question's initial plan noises from its seed (seeding.py), stacked [sum(plans), L, d_z]."""
        cfg = self.checkpoint.codec.cfg
        return torch.cat([plan_noise(s, m, cfg.latent_tokens, cfg.latent_dim) for s, m in zip(seeds, plans)])

    def seeded_plans(self, prompt_embeds: list[torch.Tensor], plans: list[int], seeds: list[int | None],
                     **overrides) -> list[torch.Tensor]:
        """Each question's plans [M_q, L, d_z] from its own seed, all denoised in one pass."""
        sample = self.sample_plans(prompt_embeds, plans, init_noise=self.plan_noise(seeds, plans), **overrides)
        return list(sample.latents.split(plans))

    def rows(self, prompt_embeds: list[torch.Tensor], plans: list[torch.Tensor] | None, texts_per_row: list[int],
             params: list[SamplingParams]) -> Rows:
        """The one prompts -> rows step (generation, the server's engine, RL rollouts): question q
        has the plans `plans[q]` [M_q, L, d_z] (None: one plan-less row), `texts_per_row[q]` texts
        each, seeded from `params[q].seed` by the seeding rule."""
        rows = Rows([], None, [], [], [], [])
        kept = []
        for q, (e, n, p) in enumerate(zip(prompt_embeds, texts_per_row, params, strict=True)):
            count = 1 if plans is None else plans[q].shape[0]
            for m, params_m in enumerate(row_params(p, [n] * count)):
                rows.embeds.append(e)
                rows.counts.append(n)
                rows.params.append(params_m)
                rows.question.append(q)
                rows.plan_index.append(None if plans is None else m)
            if plans is not None:
                kept.append(plans[q])
        rows.plans = torch.cat(kept) if kept else None
        return rows

    @torch.no_grad()
    def decode_rows(self, rows: Rows, observer: StepObserver | None = None) -> list[list[Decoded]]:
        return self.decode(rows.embeds, rows.plans, rows.counts, rows.params, observer)

    @torch.no_grad()
    def generate(self, prompts: list[str], plans: int = 1, samples_per_plan: int = 1,
                 params: SamplingParams | None = None, chat: bool = True, **plan_overrides) -> list[Generation]:
        """M plans x N texts per prompt (M x N plain samples for a token-level checkpoint)."""
        params = params or SamplingParams()
        if plans < 1 or samples_per_plan < 1:
            raise ValueError("plans and samples_per_plan must be >= 1")
        ids = self.prompt_ids(prompts, chat)
        embeds = self.prompt_embeds(ids)
        seeds = [question_seed(params.seed, q) for q in range(len(prompts))]  # the one seeding rule
        per_question = [replace(params, seed=s) for s in seeds]
        if not self.is_latent:
            rows = self.rows(embeds, None, [plans * samples_per_plan] * len(prompts), per_question)
            return [Generation(c, None) for c in rows.completions(self.decode_rows(rows))]
        latents = self.seeded_plans(embeds, [plans] * len(prompts), seeds, **plan_overrides)
        rows = self.rows(embeds, latents, [samples_per_plan] * len(prompts), per_question)
        return [Generation(c, z) for c, z in zip(rows.completions(self.decode_rows(rows)), latents)]


def generate(checkpoint: str | Path | Reasoner, prompts: list[str], plans: int = 1, samples_per_plan: int = 1,
             **kw) -> list[Generation]:
    """One-call convenience: `generate("ckpt/", ["Use 1 2 3 4 to make 10."], plans=4, samples_per_plan=2)`."""
    reasoner = checkpoint if isinstance(checkpoint, Reasoner) else Reasoner.from_checkpoint(checkpoint)
    params = SamplingParams(**{k: kw.pop(k) for k in list(kw) if k in SamplingParams.__dataclass_fields__})
    return reasoner.generate(prompts, plans, samples_per_plan, params, **kw)
