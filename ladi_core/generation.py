"""Question -> M latent plans -> N texts per plan: the path training, evaluation and serving walk.

    prompt ids ─► embed ─► policy.sample (M plans, one batch) ─► codec.plan_embeds
               └────────────────────────────────────────────► build_inputs_embeds ─► backend.generate (N each)
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .backends import Decoded, DecoderBackend, SamplingParams, StepObserver, TransformersBackend
from .checkpoint import Checkpoint, load_checkpoint
from .codec import build_inputs_embeds, plan_positions, with_plans
from .decoder import chat_prompt, load_decoder
from .policies import PlanSample
from .seeding import plan_noise, plan_params, question_seed


@dataclass
class Completion:
    text: str
    plan_index: int | None  # which latent plan of its question (None for token-level checkpoints)
    decoded: Decoded


@dataclass
class Generation:
    """Everything one call produced for one question."""

    completions: list[Completion]  # plan-major: plan 0's N texts, then plan 1's, ...
    plans: torch.Tensor | None  # [M, L, d_z] normalised latents, None for token-level


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
        if getattr(policy, "needs_decoder", False) and policy.decoder is None:
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
        return self.is_latent and not getattr(self.checkpoint.policy, "deterministic", False)

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
        codec = self.checkpoint.codec
        return with_plans(prompt_embeds, codec.plan_embeds(plans), codec.cfg.decoder_sees_question)

    @property
    def plan_positions(self) -> int:
        """Decoder positions a plan adds to every prefix (0 for a token-level checkpoint)."""
        return plan_positions(self.checkpoint.codec.cfg if self.is_latent else None)

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
        if not self.is_latent:
            per_prompt = [plan_params(params, s, 1, plans * samples_per_plan)[0] for s in seeds]
            decoded = self.backend.generate(embeds, plans * samples_per_plan, per_prompt)
            return [Generation([Completion(d.text, None, d) for d in row], None) for row in decoded]
        cfg = self.checkpoint.codec.cfg
        noise = torch.cat([plan_noise(s, plans, cfg.latent_tokens, cfg.latent_dim) for s in seeds])
        sample = self.sample_plans(embeds, plans, init_noise=noise, **plan_overrides)
        rows_embeds = [e for e in embeds for _ in range(plans)]
        per_plan = [p for s in seeds for p in plan_params(params, s, plans, samples_per_plan)]
        decoded = self.decode(rows_embeds, sample.latents, samples_per_plan, per_plan)
        out = []
        for q in range(len(prompts)):
            comps = [Completion(d.text, m, d) for m in range(plans) for d in decoded[q * plans + m]]
            out.append(Generation(comps, sample.latents[q * plans:(q + 1) * plans]))
        return out


def generate(checkpoint: str | Path | Reasoner, prompts: list[str], plans: int = 1, samples_per_plan: int = 1,
             **kw) -> list[Generation]:
    """One-call convenience: `generate("ckpt/", ["Use 1 2 3 4 to make 10."], plans=4, samples_per_plan=2)`."""
    reasoner = checkpoint if isinstance(checkpoint, Reasoner) else Reasoner.from_checkpoint(checkpoint)
    params = SamplingParams(**{k: kw.pop(k) for k in list(kw) if k in SamplingParams.__dataclass_fields__})
    return reasoner.generate(prompts, plans, samples_per_plan, params, **kw)
