"""Decoder backend on a vLLM engine (`AsyncLLM`): latent plans enter the decoder as prompt embeddings.

Each prefix `[prompt; bot; adapter(z); eot]` (built by `codec.build_inputs_embeds` /
`plan_embeds`, the same tensors the transformers backend reads) is one engine request with
n = samples per plan, so the n texts share the plan's KV prefix, and the engine batches requests
continuously. The engine lives on its own event-loop thread so the synchronous `DecoderBackend`
interface (the server's engine thread, RL rollouts) can drive it from any thread.

The token embedding table is read from the checkpoint's safetensors into this process: the
policy and the prompt embeddings need it, and a full transformers copy of the decoder does not.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..decoder import stop_token_ids
from .base import Decoded, SamplingParams, StepObserver, apply_stop, per_prefix_requests


@dataclass(frozen=True)
class VLLMOptions:
    """Engine options passed through to vLLM."""

    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    cpu_kvcache_space_gib: int | None = None  # CPU builds: VLLM_CPU_KVCACHE_SPACE
    enforce_eager: bool = True
    max_num_seqs: int | None = None  # the engine's running-sequence cap (its default when None)


def load_input_embeddings(decoder_dir: str | Path) -> torch.nn.Embedding:
    """The decoder's token embeddings, straight from its safetensors files (no model built)."""
    for f in sorted(Path(decoder_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names = set(st.keys())
            for key in ("model.embed_tokens.weight", "embed_tokens.weight"):
                if key in names:
                    return torch.nn.Embedding.from_pretrained(st.get_tensor(key).float(), freeze=True)
    raise FileNotFoundError(f"{decoder_dir}: no embed_tokens weight in its safetensors files")


class VLLMBackend:
    name = "vllm"

    def __init__(self, decoder_dir: str | Path, tokenizer, options: VLLMOptions | None = None):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        opts = options or VLLMOptions()
        if opts.cpu_kvcache_space_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(opts.cpu_kvcache_space_gib)
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self._embed = load_input_embeddings(decoder_dir)
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()
        args = AsyncEngineArgs(model=str(decoder_dir), enable_prompt_embeds=True, dtype=opts.dtype,
                               max_model_len=opts.max_model_len, gpu_memory_utilization=opts.gpu_memory_utilization,
                               tensor_parallel_size=opts.tensor_parallel_size, enforce_eager=opts.enforce_eager,
                               max_num_seqs=opts.max_num_seqs)

        async def build():
            return AsyncLLM.from_engine_args(args)

        self.engine = asyncio.run_coroutine_threadsafe(build(), self._loop).result()

    def input_embeddings(self) -> torch.nn.Module:
        return self._embed

    def generate(self, prefixes: list[torch.Tensor], n: int | Sequence[int],
                 params: SamplingParams | Sequence[SamplingParams],
                 observer: StepObserver | None = None) -> list[list[Decoded]]:
        if not prefixes:
            return []
        counts, per_prefix = per_prefix_requests(len(prefixes), n, params)
        offsets = list(itertools.accumulate([0] + counts[:-1]))
        # Prefixes that carry the same seeded SamplingParams object (one request's plans) take
        # consecutive seeds, child j of a prefix seeding with seed + j in the engine: no two rows of
        # a request share a random stream, and the request reproduces alone.
        seeds, taken = [], {}
        for sp, c in zip(per_prefix, counts):
            first = taken.get(id(sp), 0)
            seeds.append(None if sp.seed is None else sp.seed + first)
            taken[id(sp)] = first + c
        lock = threading.Lock()  # observers are written for one caller at a time
        futures = [asyncio.run_coroutine_threadsafe(self._request(p, c, sp, seed, off, observer, lock), self._loop)
                   for p, c, sp, seed, off in zip(prefixes, counts, per_prefix, seeds, offsets)]
        return [f.result() for f in futures]

    async def _request(self, prefix: torch.Tensor, n: int, p: SamplingParams, seed: int | None, row_offset: int,
                       observer: StepObserver | None, lock: threading.Lock) -> list[Decoded]:
        from vllm import SamplingParams as VSamplingParams

        sp = VSamplingParams(n=n, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, seed=seed,
                             logprobs=0, stop_token_ids=self.stop_ids, skip_special_tokens=True)
        rid = f"ladi-{next(self._ids)}"
        seen = [0] * n
        aborted = [False] * n
        latest = {}  # child index -> its newest output (an update may carry only some children)
        async for out in self.engine.generate({"prompt_embeds": prefix.detach().cpu()}, sp, rid):
            latest.update((c.index, c) for c in out.outputs)
            if observer is None:
                continue
            for c in out.outputs:
                new = c.token_ids[seen[c.index]:]
                seen[c.index] = len(c.token_ids)
                for tok in new:
                    done = tok in self.stop_ids
                    with lock:
                        abort = observer.on_step(row_offset + c.index, torch.tensor([tok]), torch.tensor([done]))
                    if abort is not None and bool(abort[0]):
                        aborted[c.index] = True
            if all(aborted):
                await self.engine.abort(rid)
                break
        results = []
        for j in range(n):
            c = latest.get(j)
            if c is None:
                results.append(Decoded("", [], 0.0, "abort"))
                continue
            ids = [t for t in c.token_ids if t not in self.stop_ids]
            text, stopped = apply_stop(c.text, p.stop)
            # like the transformers backend: the stop token's log-prob counts, its id is not returned
            lps = [lp[t].logprob for lp, t in zip(c.logprobs or [], c.token_ids)]
            reason = "abort" if aborted[j] and not stopped else ("stop" if stopped or c.finish_reason == "stop"
                                                               else "length")
            results.append(Decoded(text, ids, float(sum(lps)), reason, lps))
        return results

    def close(self) -> None:
        """Shut the engine down on its own loop (its output handler lives there), then stop the loop."""
        if self.engine is None:
            return

        async def shutdown():
            self.engine.shutdown()
            self.engine = None  # collected now, while the interpreter is whole

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=120)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
