"""Decoder backend on a vLLM engine (`AsyncLLM`): latent plans enter the decoder as prompt embeddings.

Each prefix `[prompt; bot; adapter(z); eot]` (built by `Reasoner.prefixes`: `codec.with_plans` over
`plan_embeds`, the same tensors the transformers backend reads) is one engine request with
n = samples per plan, so the n texts share the plan's KV prefix, and the engine batches requests
continuously. The engine lives on its own event-loop thread so the synchronous `DecoderBackend`
interface (the server's engine thread, RL rollouts) can drive it from any thread.

The token embedding table is read from the checkpoint's safetensors into this process: the
policy and the prompt embeddings need it, and a full transformers copy of the decoder does not.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import os
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import torch
from safetensors import safe_open

from ..decoder import stop_token_ids
from .base import BackendDead, Decoded, SamplingParams, StepObserver, apply_stop, per_prefix_requests
from .vllm_options import VLLMOptions

# vLLM-CPU's own running-sequence cap when none is given (the KV estimate below assumes it)
_CPU_DEFAULT_MAX_NUM_SEQS = 256


def cpu_kv_cache_gib(decoder_dir: str | Path, opts: VLLMOptions) -> tuple[int, str]:
    """The KV cache a CPU engine needs, in whole GiB (what VLLM_CPU_KVCACHE_SPACE takes), and how it
    was reckoned: every running sequence at the longest context, in the engine's dtype, at least
    1 GiB and at most a quarter of the machine's memory.

    Without it vLLM-CPU asks for a share of the node's *free* memory at start-up, and refuses to
    start wherever the page cache holds the rest (measured right after `make test`)."""
    import json
    import math

    cfg = json.loads((Path(decoder_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    dtype = (cfg.get("dtype") or cfg.get("torch_dtype") or "float32") if opts.dtype == "auto" else opts.dtype
    width = 4 if "32" in str(dtype) or dtype == "float" else 2
    context = opts.max_model_len or cfg.get("max_position_embeddings", 4096)
    seqs = opts.max_num_seqs or _CPU_DEFAULT_MAX_NUM_SEQS
    per_token = 2 * layers * kv_heads * head_dim * width
    need = per_token * context * seqs
    ceiling = max(1, (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // (4 * 2**30))
    gib = min(max(1, math.ceil(need / 2**30)), ceiling)
    how = (f"{per_token} B/token x {context} tokens x {seqs} sequences = {need / 2**30:.2f} GiB "
           f"-> {gib} GiB (1 GiB to {ceiling} GiB)")
    return gib, how


def resolve_options(decoder_dir: str | Path, opts: VLLMOptions) -> tuple[VLLMOptions, str | None]:
    """Options with what the platform leaves open filled in (the CPU KV cache size), and a line
    saying how, for the run's printed configuration (None when nothing was filled)."""
    import dataclasses

    from vllm.platforms import current_platform

    if current_platform.is_cpu() and opts.data_parallel_size > 1:
        raise ValueError(f"data parallelism (data_parallel_size {opts.data_parallel_size}) needs GPUs: vLLM's "
                         "CPU build runs one engine; run one server per replica behind a load balancer instead")
    if not current_platform.is_cpu() or opts.cpu_kvcache_space_gib is not None:
        return opts, None
    gib, how = cpu_kv_cache_gib(decoder_dir, opts)
    return dataclasses.replace(opts, cpu_kvcache_space_gib=gib), f"vLLM CPU KV cache: {how}"


def load_input_embeddings(decoder_dir: str | Path) -> torch.nn.Embedding:
    """The decoder's token embeddings, straight from its safetensors files (no model built)."""
    for f in sorted(Path(decoder_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names = set(st.keys())
            for key in ("model.embed_tokens.weight", "embed_tokens.weight"):
                if key in names:
                    return torch.nn.Embedding.from_pretrained(st.get_tensor(key).float(), freeze=True)
    raise FileNotFoundError(f"{decoder_dir}: no embed_tokens weight in its safetensors files")


def _settle(future: Future, task: asyncio.Task) -> None:
    """Copy a finished engine task's outcome into the caller's future."""
    if future.done():  # the caller cancelled it
        return
    if task.cancelled():
        future.cancel()
    elif task.exception() is not None:
        future.set_exception(task.exception())
    else:
        future.set_result(task.result())


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, process name) of every process below `pid`, read from /proc (Linux)."""
    parent_of, name_of = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        name_end = stat.rindex(")")  # the name may itself hold spaces or parentheses
        name_of[int(entry.name)] = stat[stat.index("(") + 1:name_end]
        parent_of[int(entry.name)] = int(stat[name_end + 2:].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parent_of.items() if parent in frontier]
        found += [(p, name_of[p]) for p in kids]
        frontier = kids
    return found


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (threads it starts later inherit their creator's mask)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (ProcessLookupError, FileNotFoundError):  # the thread ended meanwhile
            pass


def _own_collectors():
    """The `vllm:` collectors the engine just registered, held in a registry of their own: a later
    engine in the same process unregisters them from prometheus_client's global one."""
    from prometheus_client import REGISTRY, CollectorRegistry

    if os.getenv("PROMETHEUS_MULTIPROC_DIR"):  # vLLM's multiprocess mode aggregates through files
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        return get_prometheus_registry()
    own = CollectorRegistry(auto_describe=False)
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith("vllm:"):
            own.register(collector)
    return own


def structured_outputs(p: SamplingParams):
    """vLLM's structured-output request for a JSON schema (None without one)."""
    if p.json_schema is None:
        return None
    import json

    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(json=json.loads(p.json_schema))


class VLLMBackend:
    name = "vllm"
    continuous_batching = True  # concurrent generate() calls share the engine's running batch
    # vLLM counts the prompt's token ids in the repetition penalty, and a prompt sent as embeddings
    # has none: it reads whatever ids an earlier request left in the batch slot (measured: the same
    # greedy request gave different texts from a clean computation)
    unsupported = {"repetition_penalty": "vLLM applies it to the prompt's token ids too, and a prompt sent as "
                                          "embeddings has none (vLLM reads stale ids); the transformers backend "
                                          "applies it to the generated tokens"}
    free_cpus: set[int] | None  # CPU builds: the CPUs the engine's worker leaves free (the server runs there)

    def __init__(self, decoder_dir: str | Path, tokenizer, options: VLLMOptions | None = None):
        from vllm.engine.arg_utils import AsyncEngineArgs

        opts, how = resolve_options(decoder_dir, options or VLLMOptions())
        if how:
            print(how, flush=True)
        if opts.cpu_kvcache_space_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(opts.cpu_kvcache_space_gib)
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self._embed = load_input_embeddings(decoder_dir)
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()
        from vllm.platforms import current_platform

        chunked, block_size = opts.enable_chunked_prefill, opts.block_size
        if current_platform.is_cpu():
            chunked = False if chunked is None else chunked
            block_size = block_size or 32
        self._args = AsyncEngineArgs(model=str(decoder_dir), enable_prompt_embeds=True, dtype=opts.dtype,
                                     enable_chunked_prefill=chunked, block_size=block_size,
                                     max_model_len=opts.max_model_len,
                                     gpu_memory_utilization=opts.gpu_memory_utilization,
                                     tensor_parallel_size=opts.tensor_parallel_size,
                                     data_parallel_size=opts.data_parallel_size, enforce_eager=opts.enforce_eager,
                                     max_num_seqs=opts.max_num_seqs)
        self._decoder_dir = Path(decoder_dir)
        self._pin = opts.pin_engine_core and current_platform.is_cpu()
        self._live: tempfile.TemporaryDirectory | None = None  # the weights a restarted engine loads
        self.restarts = 0
        self._start(self._args)
        self._registry = _own_collectors()

    def _start(self, args) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        async def build():
            return AsyncLLM.from_engine_args(args)

        self.engine = asyncio.run_coroutine_threadsafe(build(), self._loop).result()
        self.free_cpus = self._pin_engine_core() if self._pin else None

    def _pin_engine_core(self) -> set[int] | None:
        """Keep the engine's processes where they cost least; return the CPUs its worker leaves free
        (None when there are none), where the server runs its own threads.

        vLLM-CPU binds its worker's threads to all CPUs but a reserved few and leaves the engine-core
        (scheduler) process unpinned, so the scheduler's spin-wait and the server also run on the
        worker's CPUs. The scheduler and the worker take turns (each waits while the other works),
        so a single-CPU worker shares its CPU with the scheduler at little cost, and the server gets
        the free CPUs to itself (measured on 2 CPUs: +25% tokens/s over pinning the scheduler to the
        free CPU). A worker spread over several CPUs runs an OpenMP team there that the scheduler
        would stall, so then the scheduler takes the free CPUs."""
        if not hasattr(os, "sched_setaffinity"):
            return None
        procs = _descendants(os.getpid())
        worker_cpus = set()
        for pid, name in procs:
            if name.startswith("VLLM::Worker"):
                worker_cpus |= os.sched_getaffinity(pid)
        free = os.sched_getaffinity(0) - worker_cpus
        if not worker_cpus or not free:
            return None
        for pid, name in procs:
            if name.startswith("VLLM::EngineCor"):  # the kernel keeps 15 characters of a name
                pin_process(pid, worker_cpus if len(worker_cpus) == 1 else free)
        return free

    def input_embeddings(self) -> torch.nn.Module:
        return self._embed

    def trainable_decoder(self) -> None:
        return None  # the engine holds its own weights: training pushes them with update_weights

    def dead(self) -> str | None:
        """vLLM's engine core runs in a process of its own; once it is gone every request fails."""
        engine = self.engine
        if engine is not None and engine.errored:
            return "the vLLM engine core process died"
        return None

    @property
    def max_model_len(self) -> int:
        return self.engine.model_config.max_model_len

    def prometheus_registry(self):
        """The engine's own `vllm:` collectors, for the server's /metrics."""
        return self._registry

    def generate(self, prefixes: list[torch.Tensor], n: int | Sequence[int],
                 params: SamplingParams | Sequence[SamplingParams],
                 observer: StepObserver | None = None) -> list[list[Decoded]]:
        return [f.result() for f in self.submit(prefixes, n, params, observer)]

    def submit(self, prefixes: list[torch.Tensor], n: int | Sequence[int],
               params: SamplingParams | Sequence[SamplingParams],
               observer: StepObserver | None = None) -> list[Future[list[Decoded]]]:
        """One engine request per prefix, all handed to the engine's loop in one wake-up; each
        future completes when its request does. The observer runs on the loop thread only."""
        if not prefixes:
            return []
        counts, per_prefix = per_prefix_requests(len(prefixes), n, params)
        offsets = list(itertools.accumulate([0] + counts[:-1]))
        # each prefix is seeded by its own params (seeding.py); child j of a prefix seeds with seed + j
        futures: list[Future[list[Decoded]]] = [Future() for _ in prefixes]
        requests = list(zip(prefixes, counts, per_prefix, [p.seed for p in per_prefix], offsets, futures))

        def start():
            for prefix, c, sp, seed, off, fut in requests:
                task = self._loop.create_task(self._request(prefix, c, sp, seed, off, observer))
                task.add_done_callback(functools.partial(_settle, fut))
                # a cancelled future cancels its task, and vLLM aborts a cancelled request
                fut.add_done_callback(lambda f, t=task: f.cancelled() and self._loop.call_soon_threadsafe(t.cancel))

        self._loop.call_soon_threadsafe(start)
        return futures

    async def _request(self, prefix: torch.Tensor, n: int, p: SamplingParams, seed: int | None, row_offset: int,
                       observer: StepObserver | None) -> list[Decoded]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        # A watched request gets DELTA updates (only the new tokens, each step); the others one
        # FINAL_ONLY output, which spares the loop thread a wake-up per token.
        if observer is not None and not observer.watches(row_offset):
            observer = None
        kind = RequestOutputKind.FINAL_ONLY if observer is None else RequestOutputKind.DELTA
        sp = VSamplingParams(n=n, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, seed=seed,
                             min_tokens=p.min_tokens, top_k=p.top_k, min_p=p.min_p,
                             presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                             repetition_penalty=p.repetition_penalty, logit_bias=dict(p.logit_bias) or None,
                             ignore_eos=p.ignore_eos, structured_outputs=structured_outputs(p),
                             logprobs=p.top_logprobs if p.logprobs else None,
                             stop_token_ids=[] if p.ignore_eos else self.stop_ids,
                             detokenize=False, output_kind=kind)  # texts: one decode at the end, below
        rid = f"ladi-{next(self._ids)}"
        ids: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        tops: list[list[list[tuple[int, float]]]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        aborted = [False] * n
        dead = self.dead()
        if dead is not None:
            raise BackendDead(dead)
        try:
            await self._collect(prefix, sp, rid, ids, lps, tops, finish, aborted, observer, row_offset)
        except EngineDeadError as err:  # raised to requests before `errored` may say so
            raise BackendDead("the vLLM engine core process died") from err
        except Exception as err:  # whatever else a dying engine raises first
            dead = self.dead()
            if dead is not None:
                raise BackendDead(dead) from err
            raise
        return self._results(n, ids, lps, tops, finish, aborted, p)

    async def _collect(self, prefix, sp, rid, ids, lps, tops, finish, aborted, observer, row_offset) -> None:
        """One engine request's outputs, gathered into ids / lps / tops / finish / aborted (one list per text)."""
        stops = set(sp.stop_token_ids or ())
        async for out in self.engine.generate({"prompt_embeds": prefix.detach().cpu()}, sp, rid):
            for c in out.outputs:
                j = c.index
                new = list(c.token_ids)
                ids[j].extend(new)
                if c.logprobs:
                    lps[j].extend(lp[t].logprob for lp, t in zip(c.logprobs, new))
                    if sp.logprobs:  # the top alternatives by rank (the sampled token rides along)
                        tops[j].extend(sorted(((tid, x.logprob) for tid, x in lp.items() if x.rank <= sp.logprobs),
                                              key=lambda a: -a[1]) for lp in c.logprobs)
                finish[j] = c.finish_reason or finish[j]
                if observer is None:
                    continue
                for tok in new:
                    abort = observer.on_step(row_offset + j, [tok], [tok in stops])
                    if abort is not None and abort[0]:
                        aborted[j] = True
            if all(aborted):
                await self.engine.abort(rid)
                break

    def _results(self, n, ids, lps, tops, finish, aborted, p: SamplingParams) -> list[Decoded]:
        results = []
        for j in range(n):
            if not ids[j] and finish[j] is None:
                results.append(Decoded("", [], 0.0 if p.logprobs else None, "abort"))
                continue
            kept = list(ids[j]) if p.ignore_eos else [t for t in ids[j] if t not in self.stop_ids]
            text, stopped = apply_stop(self.tokenizer.decode(kept, skip_special_tokens=True), p.stop)
            # like the transformers backend: the stop token's log-prob counts, its id is not returned
            reason = "abort" if aborted[j] and not stopped else ("stop" if stopped or finish[j] == "stop"
                                                               else "length")
            logprob = float(sum(lps[j])) if p.logprobs else None
            top = tops[j][:len(kept)] if p.top_logprobs and p.logprobs else None
            results.append(Decoded(text, kept, logprob, reason, lps[j], top))
        return results

    @property
    def reloads_in_place(self) -> bool:
        """vLLM's CPU build packs every linear layer's weights into oneDNN/SGL kernels at load time
        and frees the originals, so an in-place reload updates norms, biases and embeddings but not
        the matmuls (measured: the weights read back as empty tensors): there, `update_weights`
        restarts the engine on the new weights instead. GPU builds reload in place."""
        from vllm.platforms import current_platform

        return not current_platform.is_cpu()

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load new decoder weights into the engine (RL, when the decoder trains).

        GPU builds: the weights travel as a safetensors file that the engine's workers reload in
        place (tensors do not cross vLLM's RPC intact), and cached prompt prefixes computed with the
        old weights are dropped. The CPU build cannot reload in place (`reloads_in_place`): the engine
        is shut down and started again on a private copy of the decoder directory holding the new
        weights (seconds to a minute, against milliseconds). Tied weights (lm_head = embed_tokens)
        are sent once."""
        from safetensors.torch import save_file

        embed = state_dict.get("model.embed_tokens.weight")
        head = state_dict.get("lm_head.weight")
        tied = embed is not None and head is not None and head.data_ptr() == embed.data_ptr()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()
                   if not (tied and k == "lm_head.weight")}
        if embed is not None:
            self._embed.weight.data.copy_(embed.detach().float().cpu())

        if not self.reloads_in_place:
            self._restart_on(tensors)
            return

        async def reload(path: str):
            await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": path,
                                                                       "is_checkpoint_format": True})
            await self.engine.reset_prefix_cache()

        with tempfile.TemporaryDirectory(prefix="ladi-weights-") as tmp:
            save_file(tensors, os.path.join(tmp, "model.safetensors"))
            asyncio.run_coroutine_threadsafe(reload(tmp), self._loop).result()

    def _restart_on(self, tensors: dict[str, torch.Tensor]) -> None:
        """Shut the engine down and start it again on the decoder directory's files (config,
        tokenizer) with `tensors` as its weights, in a private directory this backend owns."""
        from dataclasses import replace

        from safetensors.torch import save_file

        if self._live is None:
            self._live = tempfile.TemporaryDirectory(prefix="ladi-engine-weights-")
            for f in self._decoder_dir.iterdir():
                if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
                    (Path(self._live.name) / f.name).write_bytes(f.read_bytes())
        save_file(tensors, os.path.join(self._live.name, "model.safetensors"))
        self._shutdown_engine()
        self._start(replace(self._args, model=self._live.name))
        self.restarts += 1

    def _shutdown_engine(self) -> None:
        """Shut the engine down on its own loop (its output handler lives there)."""

        async def shutdown():
            self.engine.shutdown()
            self.engine = None  # collected now, while the interpreter is whole

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=120)

    def close(self) -> None:
        """Shut the engine down, then stop its loop and drop the restarted engine's weights."""
        if self.engine is None:
            return
        self._shutdown_engine()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if self._live is not None:
            self._live.cleanup()
