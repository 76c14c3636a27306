"""The scheduler between HTTP and the model: a bounded queue and one worker thread that batches
requests arriving together. A batch's plans are denoised in one policy pass and all its (plan,
sample) rows handed to the backend in one call; per-request seeds keep results independent of
company.

How many batches decode at once follows the backend: the transformers backend decodes in the
calling thread, so one batch decodes at a time; vLLM schedules concurrent calls into its own
continuous batches, so the worker keeps denoising new arrivals and submitting them while earlier
batches are still decoding (up to `max_inflight_batches`). Each request is answered as soon as
its own rows are done, not when its whole batch is: the backend returns one future per prefix,
and the last of a request's futures to finish answers it (from whichever thread finished it).

Events flow back to each request's asyncio queue: ("delta", candidate, text) while decoding (for
streaming), then ("done", candidates) or ("error", exception). A request whose client left is
cancelled: its futures are cancelled, which aborts its rows in the backend.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ladi_core.backends import SamplingParams
from ladi_core.generation import Completion, Reasoner
from ladi_core.metrics import mean_pairwise_distance

from .metrics import ServerMetrics


class QueueFull(Exception):
    pass


@dataclass(eq=False)  # identity semantics: jobs are keys
class Job:
    """One prompt's worth of work: `plans` x `samples_per_plan` candidates, plan-major."""

    prompt_ids: list[int]
    plans: int
    samples_per_plan: int
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    overrides: dict = field(default_factory=dict)  # steps / guidance / diversity / repulsion
    stream: bool = False
    mode: str = "sample"
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    futures: list[Future] = field(default_factory=list)  # its decoding prefixes, once submitted
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    latent_s: float = 0.0
    decode_s: float = 0.0
    plan_distance: float | None = None  # its plans' mean pairwise distance, when it has several

    @property
    def rows(self) -> int:
        return self.plans * self.samples_per_plan

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the request's event loop is gone (server shutting down)
            self.cancel()

    def cancel(self) -> None:
        """The client is gone: drop the job if it still waits, abort its rows if they decode."""
        self.cancelled.set()
        for f in list(self.futures):
            f.cancel()


class _RowTracker:
    """The backend's step observer for one batch: streams text deltas, applies stop strings early,
    and aborts the rows of cancelled requests."""

    def __init__(self, tokenizer, row_job: list[Job], row_cand: list[int]):
        self.tok = tokenizer
        self.row_job, self.row_cand = row_job, row_cand
        self.ids: dict[int, list[int]] = {}
        self.sent: dict[int, int] = {}
        self.finished: set[int] = set()

    def watches(self, row: int) -> bool:
        """Streams and stop strings need every token; other rows only their end."""
        job = self.row_job[row]
        return job.stream or bool(job.params.stop)

    def on_step(self, row_offset: int, tokens: list[int], done: list[bool]) -> list[bool] | None:
        now = time.monotonic()
        abort = [False] * len(tokens)
        for i, (t, d) in enumerate(zip(tokens, done)):
            r = row_offset + i
            if r in self.finished:
                continue
            job = self.row_job[r]
            if job.stream and job.first_token_at is None:  # a first token only a stream delivers
                job.first_token_at = now
            if job.cancelled.is_set():
                abort[i] = True
                self.finished.add(r)
                continue
            if d:  # a stop token: nothing to show
                self.finished.add(r)
                continue
            stop = job.params.stop
            if not job.stream and not stop:
                continue
            ids = self.ids.setdefault(r, [])
            ids.append(t)
            text = self.tok.decode(ids, skip_special_tokens=True)
            hit = min((k for k in (text.find(s) for s in stop) if k >= 0), default=-1)
            if hit >= 0:
                text, abort[i] = text[:hit], True
                self.finished.add(r)
                safe = len(text)
            else:  # hold back what could still become a stop string, and half-decoded characters
                safe = len(text) - (max((len(s) for s in stop), default=1) - 1)
                while safe > 0 and text[safe - 1] == "\ufffd":
                    safe -= 1
            sent = self.sent.get(r, 0)
            if job.stream and safe > sent:
                job.emit(("delta", self.row_cand[r], text[sent:safe]))
                self.sent[r] = safe
        return abort if any(abort) else None

    def flush(self, r: int, final_text: str) -> None:
        job = self.row_job[r]
        sent = self.sent.get(r, 0)
        if job.stream and len(final_text) > sent:
            job.emit(("delta", self.row_cand[r], final_text[sent:]))


@dataclass
class _Prepared:
    """A batch after its latent pass: one decoder prefix per (job, plan), each row mapped back."""

    jobs: list[Job]
    prefix_embeds: list[torch.Tensor]
    plans: torch.Tensor | None
    counts: list[int]
    params: list[SamplingParams]
    prefix_job: list[Job]
    prefix_plan: list[int | None]
    row_job: list[Job]
    row_cand: list[int]
    latent_s: float


class Engine:
    def __init__(self, reasoner: Reasoner, metrics: ServerMetrics, *, max_queue: int = 256,
                 max_batch_requests: int = 32, max_batch_sequences: int = 1024, batch_window_ms: float = 5.0,
                 max_inflight_batches: int | None = None):
        self.reasoner = reasoner
        self.metrics = metrics
        if reasoner.is_latent:
            reasoner.checkpoint.policy.prepare_for_serving()
        self.max_batch_requests = max_batch_requests
        self.max_batch_sequences = max_batch_sequences
        self.window = batch_window_ms / 1000
        # vLLM: enough that the worker never waits for a slot while the engine has room (with
        # 8, 16 clients' small batches used them all up); the cap keeps back-pressure in the queue
        self.max_inflight = max_inflight_batches or (64 if reasoner.backend.continuous_batching else 1)
        self._slots = threading.BoundedSemaphore(self.max_inflight)
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._carry: deque[Job] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._worker, name="ladi-engine", daemon=True)
        self._lock = threading.Lock()
        self.running = 0

    # --- called from the event loop ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server is at capacity ({self._queue.maxsize} requests waiting)") from None
        self.metrics.waiting.set(self.waiting)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._carry)

    # --- the worker thread --------------------------------------------------------------------------
    def _next_batch(self) -> list[Job]:
        first = self._carry.popleft() if self._carry else self._queue.get(timeout=0.1)
        batch, rows = [first], first.rows
        # company is waited for until the oldest request has waited the window since it arrived:
        # under load the queue filled during the last policy pass, and nobody waits again
        deadline = first.arrival + self.window
        while len(batch) < self.max_batch_requests:
            if self._carry:
                job = self._carry.popleft()
            else:
                left = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
            if rows + job.rows > self.max_batch_sequences:
                self._carry.appendleft(job)
                break
            batch.append(job)
            rows += job.rows
        return batch

    def _worker(self) -> None:
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=0.1):  # every decoding slot busy
                continue
            handed_off = False
            try:
                batch = self._next_batch()
                live = []
                for job in batch:
                    if job.cancelled.is_set():
                        job.emit(("error", asyncio.CancelledError()))
                    else:
                        live.append(job)
                self.metrics.waiting.set(self.waiting)
                if not live:
                    continue
                self._count_running(len(live))
                self.metrics.batch_requests.observe(len(live))
                try:
                    prepared = self._prepare(live)
                except Exception as err:  # one bad batch must not kill the worker
                    self._fail(live, err)
                    continue
                handed_off = True  # the batch's last future gives the slot back
                self._decode(prepared)
            except queue.Empty:
                continue
            finally:
                if not handed_off:
                    self._slots.release()

    def _count_running(self, delta: int) -> None:
        with self._lock:
            self.running += delta
            self.metrics.running.set(self.running)

    def _fail(self, jobs: list[Job], err: Exception) -> None:
        for job in jobs:
            job.emit(("error", err))
        self._count_running(-len(jobs))

    def _decode(self, prep: _Prepared) -> None:
        """Submit one batch's prefixes; each job is answered when its own futures are done, and the
        decoding slot is given back with the batch's last one."""
        t0 = time.monotonic()
        tracker = _RowTracker(self.reasoner.tokenizer, prep.row_job, prep.row_cand)
        starts = list(itertools.accumulate([0] + prep.counts[:-1]))
        prefixes_of: dict[Job, list[int]] = {}
        for i, job in enumerate(prep.prefix_job):
            prefixes_of.setdefault(job, []).append(i)
        left = {job: len(idx) for job, idx in prefixes_of.items()}
        batch_left = len(prep.prefix_job)
        lock = threading.Lock()
        try:
            with torch.inference_mode():
                futures = self.reasoner.submit_decode(prep.prefix_embeds, prep.plans, prep.counts, prep.params,
                                                      tracker)
        except Exception as err:  # the backend refused the batch: every job hears it
            self._fail(prep.jobs, err)
            self._batch_done(t0)
            return

        def finished(job: Job, _f: Future) -> None:
            nonlocal batch_left
            with lock:
                left[job] -= 1
                batch_left -= 1
                job_done, batch_done = left[job] == 0, batch_left == 0
            if job_done:
                self._answer(job, [(prep.prefix_plan[i], starts[i], futures[i]) for i in prefixes_of[job]],
                             tracker, prep.latent_s, time.monotonic() - t0)
            if batch_done:
                self._batch_done(t0)

        for job, idx in prefixes_of.items():
            job.futures = [futures[i] for i in idx]
            if job.cancelled.is_set():  # the client left while its plans were denoised
                job.cancel()
        for f, job in zip(futures, prep.prefix_job):
            f.add_done_callback(functools.partial(finished, job))

    def _batch_done(self, t0: float) -> None:
        self.metrics.decode_seconds.observe(time.monotonic() - t0)
        self._slots.release()

    def _answer(self, job: Job, rows: list[tuple[int | None, int, Future]], tracker: _RowTracker,
                latent_s: float, decode_s: float) -> None:
        """A job's candidates, plan-major, from its prefixes' results; or its error."""
        try:
            cands = []
            for plan_idx, row, fut in rows:
                for j, d in enumerate(fut.result()):
                    tracker.flush(row + j, d.text)
                    cands.append(Completion(d.text, plan_idx, d))
        except Exception as err:
            self._fail([job], err)
            return
        job.latent_s, job.decode_s = latent_s, decode_s
        if self.reasoner.is_latent:
            self.metrics.plans.inc(job.plans)
        self.metrics.generation_tokens.inc(sum(len(c.decoded.token_ids) for c in cands))
        job.emit(("done", cands))
        self._count_running(-1)

    @torch.inference_mode()
    def _prepare(self, jobs: list[Job]) -> _Prepared:
        """Prompt embeddings and every job's plans (one policy pass per sampler setting)."""
        r = self.reasoner
        t0 = time.monotonic()
        for job in jobs:
            self.metrics.queue_seconds.observe(t0 - job.arrival)
        embeds = r.prompt_embeds([j.prompt_ids for j in jobs])
        latents = self._sample_plans(jobs, embeds) if r.is_latent else None
        rows = r.rows(embeds, latents, [job.samples_per_plan if latents is not None else job.rows for job in jobs],
                      [job.params for job in jobs])  # the one prompts -> rows step
        if latents is not None:
            for job, z in zip(jobs, latents):
                job.plan_distance = mean_pairwise_distance(z) if job.plans > 1 else None
        prefix_job = [jobs[q] for q in rows.question]
        row_job, row_cand = [], []
        for job, m, n in zip(prefix_job, rows.plan_index, rows.counts):
            row_job.extend([job] * n)
            row_cand.extend(range((m or 0) * n, (m or 0) * n + n))
        latent_s = time.monotonic() - t0
        if r.is_latent:
            self.metrics.latent_seconds.observe(latent_s)
        return _Prepared(jobs, rows.embeds, rows.plans, rows.counts, rows.params, prefix_job, rows.plan_index,
                         row_job, row_cand, latent_s)

    def _sample_plans(self, jobs: list[Job], embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each request's plans from its own seed; requests with the same sampler settings share a pass."""
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(tuple(sorted(job.overrides.items())), []).append(i)
        latents: list[torch.Tensor | None] = [None] * len(jobs)
        for key, idxs in groups.items():
            plans = self.reasoner.seeded_plans([embeds[i] for i in idxs], [jobs[i].plans for i in idxs],
                                               [jobs[i].params.seed for i in idxs], **dict(key))
            for i, z in zip(idxs, plans):
                latents[i] = z
        return latents  # type: ignore[return-value]
