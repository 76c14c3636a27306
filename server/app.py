"""HTTP layer: OpenAI-compatible routes, auth, limits, error shapes, and the server's lifecycle
(health that tells the truth, deadlines, draining on SIGTERM). Validation is `validate.py`'s
one step; everything model-related happens in the engine; this file turns plans of work into
engine jobs and results into responses built from `protocol.py`'s models."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ladi_core.backends import BackendDead
from ladi_core.checkpoint import git_commit
from ladi_core.generation import Reasoner
from ladi_core.seeding import question_seed

from .config import ServerConfig
from .engine import Engine, Job, QueueFull
from .errors import APIError, DeadlineExceeded, ShuttingDown, from_failure
from .metrics import ServerMetrics
from .modes import select, spread
from .protocol import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    LadiInfo,
    PassAtK,
    Usage,
    new_id,
    now,
)
from .validate import WorkPlan, plan_request

HEALTH_POLL_S = 0.5  # how often the backend's liveness is checked


class ClientGone(Exception):
    pass


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def read_json(request: Request, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes exceeds the limit of {limit}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return data


def parse(model_cls, data: dict):
    model_cls.reject_unknown(data)
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(x) for x in first["loc"]) or None
        raise APIError(400, f"invalid parameter {param}: {first['msg']}", param=param,
                       code="invalid_parameter") from None


class Server:
    """The app's state: config, reasoner, engine, metrics, the requests in flight, and whether the
    server still takes work (its backend alive, no shutdown under way)."""

    def __init__(self, cfg: ServerConfig, reasoner: Reasoner, backend_name: str):
        self.cfg = cfg
        self.reasoner = reasoner
        self.model_name = cfg.served_model_name or reasoner.checkpoint.path.name
        self.metrics = ServerMetrics()
        self.metrics.info.labels(self.model_name, reasoner.checkpoint.config.kind, backend_name).set(1)
        if hasattr(reasoner.backend, "prometheus_registry"):
            self.metrics.backend_registries.append(reasoner.backend.prometheus_registry())
        self.engine = Engine(reasoner, self.metrics, max_queue=cfg.max_queue,
                             max_batch_requests=cfg.max_batch_requests,
                             max_batch_sequences=cfg.max_batch_sequences, batch_window_ms=cfg.batch_window_ms)
        self.backend_name = backend_name
        self.inflight: set[RequestContext] = set()
        self.dead: str | None = None  # why the backend can no longer decode
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop serving requests, once started
        # Set by whoever runs the server (`python -m server`): asked to end the process, non-zero,
        # once the backend is dead, so that a supervisor restarts it.
        self.on_fatal: Callable[[str], None] | None = None

    def check_auth(self, request: Request) -> None:
        if self.cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.cfg.api_key}":
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    def admit(self) -> None:
        """Refuse new work at once when none can be done."""
        if self.dead is not None:
            raise from_failure(BackendDead(self.dead))
        if self.draining:
            raise APIError(503, "the server is shutting down and takes no new requests", "server_error",
                           code="shutting_down")

    def fail_all(self, err: BaseException) -> None:
        """Every request in flight ends now with `err` (as a clear error object, never a cut)."""
        for ctx in list(self.inflight):
            ctx.fail(err)

    def failure(self, err: BaseException) -> APIError:
        """The error a failed request answers with; a request that found the backend dead marks the
        whole server dead at once (before /health could next be asked), not at the next poll."""
        if isinstance(err, BackendDead):
            self.backend_died(str(err))
        return from_failure(err)

    def backend_died(self, reason: str) -> None:
        if self.dead is not None:
            return
        self.dead = reason
        print(f"fatal: {reason}; failing {len(self.inflight)} requests in flight and exiting", flush=True)
        self.fail_all(BackendDead(reason))
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def drain(self, grace_s: float) -> bool:
        """SIGTERM: take no new requests, let those in flight finish for `grace_s`, then end the rest
        with a clear error. False for a second signal, or one before the app started."""
        loop = self.loop
        if self.draining or loop is None:
            return False
        self.draining = True
        print(f"shutting down: {len(self.inflight)} requests in flight get up to {grace_s:.0f}s", flush=True)
        timer = threading.Timer(max(0.0, grace_s - 0.5),
                                lambda: loop.call_soon_threadsafe(self.fail_all, ShuttingDown()))
        timer.daemon = True
        timer.start()
        return True

    def wait_drained(self, timeout_s: float) -> None:
        """Until no request is in flight (any left after the grace have been failed by then)."""
        end = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < end:
            time.sleep(0.05)

    async def watch_backend(self) -> None:
        while self.dead is None:
            reason = self.reasoner.backend.dead()
            if reason is not None:
                self.backend_died(reason)
                return
            await asyncio.sleep(HEALTH_POLL_S)


def create_app(cfg: ServerConfig, reasoner: Reasoner, backend_name: str = "transformers",
               owns_reasoner: bool = False) -> FastAPI:
    """owns_reasoner: shut the backend down with the app (the vLLM engine lives in processes of its
    own, and uvicorn ends the process by re-raising SIGTERM, so this is the last chance)."""
    srv = Server(cfg, reasoner, backend_name)

    @asynccontextmanager
    async def lifespan(app):
        srv.loop = asyncio.get_running_loop()
        srv.engine.start()
        watcher = asyncio.create_task(srv.watch_backend())
        yield
        watcher.cancel()
        srv.engine.stop()
        close = getattr(reasoner.backend, "close", None)
        if owns_reasoner and close is not None and srv.dead is None:
            close()

    app = FastAPI(title="LaDi reasoning server", lifespan=lifespan)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return _error(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(APIError(err.status_code, str(err.detail), kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err):
        return _error(APIError(400, str(err), code="invalid_parameter"))

    @app.exception_handler(Exception)
    async def _internal(request, err):
        return _error(APIError(500, f"internal error: {type(err).__name__}", "server_error"))

    @app.get("/health")
    async def health():
        if srv.dead is not None:
            return JSONResponse({"status": "dead", "reason": srv.dead, "model": srv.model_name}, status_code=503)
        if srv.draining:
            return JSONResponse({"status": "draining", "model": srv.model_name}, status_code=503)
        return {"status": "ok", "model": srv.model_name}

    @app.get("/version")
    async def version_info():
        try:
            v = version("ladi")
        except PackageNotFoundError:
            v = "unknown"
        prov = srv.reasoner.checkpoint.config.provenance
        return {"version": v, "commit": git_commit(), "backend": srv.backend_name,
                "checkpoint": {"path": str(srv.reasoner.checkpoint.path), "kind": srv.reasoner.checkpoint.config.kind,
                               "policy": srv.reasoner.checkpoint.policy.kind if srv.reasoner.is_latent else None,
                               "made_by": prov.command, "commit": prov.commit, "metrics": prov.metrics}}

    @app.get("/metrics")
    async def metrics():
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        srv.check_auth(request)
        ck = srv.reasoner.checkpoint
        return {"object": "list", "data": [{
            "id": srv.model_name, "object": "model", "created": int(ck.path.stat().st_mtime), "owned_by": "ladi",
            "ladi": {"kind": ck.config.kind, "policy": ck.policy.kind if ck.policy is not None else None,
                     "task": ck.config.task, "backend": srv.backend_name}}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    async def handle(request: Request, chat: bool):
        arrival = time.monotonic()
        mode = "unknown"
        try:
            srv.check_auth(request)
            req = parse(ChatCompletionRequest if chat else CompletionRequest,
                        await read_json(request, cfg.limits.max_body_bytes))
            mode = req.mode
            srv.admit()
            plan = plan_request(cfg, srv.reasoner, req, srv.model_name)
        except APIError as err:
            srv.metrics.requests.labels(mode, str(err.status)).inc()
            return _error(err)

        loop = asyncio.get_running_loop()
        lay = plan.layout
        # prompt p of a request is asked with question_seed(seed, p): the one seeding rule
        jobs = [Job(ids, lay.plans, lay.samples_per_plan, replace(plan.params, seed=question_seed(plan.params.seed, p)),
                    loop, plan.overrides, req.stream, req.mode) for p, ids in enumerate(plan.prompts)]
        try:
            for job in jobs:
                srv.engine.submit(job)
        except QueueFull as err:
            for job in jobs:
                job.cancel()
            srv.metrics.requests.labels(mode, "429").inc()
            return _error(APIError(429, str(err), "rate_limit_error", code="queue_full"))
        srv.metrics.prompt_tokens.inc(sum(len(i) for i in plan.prompts))
        ctx = RequestContext(srv, req.mode, req.stream_options, plan, jobs, chat, arrival)
        if req.stream:
            return StreamingResponse(ctx.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            body = await ctx.complete(request)
        except ClientGone:
            ctx.observe("499")
            return Response(status_code=499)
        except Exception as err:
            failure = srv.failure(err)
            ctx.observe(str(failure.status))
            return _error(failure)
        ctx.observe("200")
        return JSONResponse(body)

    return app


def _mean_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 6) if known else None


def logprobs_body(tokenizer, decoded, chat: bool) -> dict:
    """OpenAI's log-prob shapes for one text: chat's `content` list (token, logprob, bytes,
    top_logprobs) or the completions API's parallel lists. Tokens are the returned ones (a stop
    token that ended the text is not returned, so neither is its log-prob)."""
    ids = decoded.token_ids
    lps = decoded.token_logprobs[:len(ids)]
    tops = decoded.top_logprobs or [[] for _ in ids]
    piece = tokenizer.decode

    if chat:
        def entry(tid, lp):
            t = piece([tid])
            return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                            for t, lp, top in zip(ids, lps, tops)], "refusal": None}
    tokens = [piece([t]) for t in ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": lps,
            "top_logprobs": [{piece([a]): b for a, b in top} for top in tops] if decoded.top_logprobs else None,
            "text_offset": offsets}


class RequestContext:
    """One accepted request: waits for its jobs (up to its deadline) and shapes the OpenAI
    response or stream. While it lives it is in `Server.inflight`, where a dead backend or the
    end of a shutdown's grace period can end it with a clear error."""

    def __init__(self, srv: Server, mode: str, stream_options, plan: WorkPlan, jobs: list[Job], chat: bool,
                 arrival: float):
        self.srv, self.mode, self.stream_options, self.plan, self.jobs = srv, mode, stream_options, plan, jobs
        self.lay = plan.layout
        self.chat, self.arrival = chat, arrival
        self.deadline = arrival + srv.cfg.request_timeout_s
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.object = "chat.completion" if chat else "text_completion"
        self._observed = False
        srv.inflight.add(self)

    def observe(self, status: str) -> None:
        if self._observed:
            return
        self._observed = True
        self.srv.inflight.discard(self)
        m = self.srv.metrics
        m.requests.labels(self.mode, status).inc()
        m.e2e.labels(self.mode).observe(time.monotonic() - self.arrival)
        firsts = [j.first_token_at for j in self.jobs if j.first_token_at is not None]
        if firsts:
            m.ttft.observe(min(firsts) - self.arrival)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    def fail(self, err: BaseException) -> None:
        """End this request with `err`: the waiting handler raises it; the engine drops its rows."""
        for job in self.jobs:
            job.events.put_nowait(("error", err))
        self.cancel()

    async def _next_event(self, job: Job, request: Request | None) -> tuple:
        """The job's next event; a client that left or a deadline that passed ends the wait."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.cancel()
                raise DeadlineExceeded(f"the request ran past the server's limit of "
                                       f"{self.srv.cfg.request_timeout_s:g}s (--request-timeout-s); "
                                       "its generation was aborted")
            try:
                ev = await asyncio.wait_for(job.events.get(), timeout=min(0.25, left))
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    raise ClientGone from None
                continue
            if ev[0] == "error":
                raise ev[1]
            return ev

    async def _select(self, cands):
        p = self.plan
        return await asyncio.to_thread(select, self.mode, cands, self.lay, p.rule, p.verifier, p.reference)

    def _logprobs(self, decoded) -> dict | None:
        """A choice's log-probs in the endpoint's OpenAI shape, when the request asked for them."""
        if not self.plan.logprobs:
            return None
        return logprobs_body(self.srv.reasoner.tokenizer, decoded, self.chat)

    def _choice(self, index: int, scored) -> ChatChoice | CompletionChoice:
        c = scored.cand
        extras = {"plan_index": c.plan_index, "score": scored.score, "verified": scored.verified,
                  "logprobs": self._logprobs(c.decoded)}
        if self.chat:
            return ChatChoice(index=index, message=ChatChoiceMessage(content=c.text), finish_reason=c.finish_reason,
                              **extras)
        return CompletionChoice(index=index, text=c.text, finish_reason=c.finish_reason, **extras)

    def _usage(self, all_cands) -> Usage:
        prompt = sum(len(j.prompt_ids) for j in self.jobs)
        completion = sum(len(c.decoded.token_ids) for cands in all_cands for c in cands)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _ladi(self) -> LadiInfo:
        return LadiInfo(mode=self.mode, latent_plans=self.lay.plans if self.srv.reasoner.is_latent else None,
                        samples_per_plan=self.lay.samples_per_plan,
                        latent_seconds=round(max(j.latent_s for j in self.jobs), 4),
                        decode_seconds=round(max(j.decode_s for j in self.jobs), 4),
                        plan_distance=_mean_or_none([j.plan_distance for j in self.jobs]))

    async def complete(self, request: Request) -> dict:
        choices, summaries, all_cands = [], [], []
        try:
            for job in self.jobs:
                cands = (await self._next_event(job, request))[1]
                all_cands.append(cands)
                scored, summary = await self._select(cands)
                base = len(choices)
                choices.extend(self._choice(base + i, s) for i, s in enumerate(scored))
                if summary is not None:
                    summaries.append(PassAtK(**summary))
        except BaseException:
            self.cancel()
            raise
        return CompletionResponse(
            id=self.id, object=self.object, created=self.created, model=self.srv.model_name, choices=choices,
            usage=self._usage(all_cands), ladi=self._ladi(),
            pass_at_k=(summaries[0] if len(summaries) == 1 else summaries) if summaries else None).body()

    # --- streaming -------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], usage: Usage | None = None, **extra) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.srv.model_name,
                "choices": choices, **extra}
        if usage is not None:
            body["usage"] = usage.model_dump()
        return f"data: {json.dumps(body)}\n\n"

    def _delta(self, index: int, text: str | None = None, role: bool = False, finish=None, extras=None) -> dict:
        if self.chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            out = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            out = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        if extras:
            out.update(extras)
        return out

    def _live_order(self) -> list[int]:
        """Sample mode streams as it decodes: the candidates that become choices 0..n-1, in the
        order `modes.spread` gives them (the same that `select` returns)."""
        if self.mode != "sample":
            return []
        return spread(list(range(self.lay.total)), self.lay)[: self.lay.choices]

    async def stream(self):
        n = self.lay.choices
        status = "200"
        all_cands = []
        try:
            if self.chat:
                yield self._chunk([self._delta(i, "", role=True) for i in range(n * len(self.jobs))])
            order = self._live_order()
            for p, job in enumerate(self.jobs):
                live = {cand: p * n + i for i, cand in enumerate(order)}
                while True:
                    ev = await self._next_event(job, None)
                    if ev[0] == "delta":
                        if ev[1] in live:
                            yield self._chunk([self._delta(live[ev[1]], ev[2])])
                        continue
                    cands = ev[1]
                    all_cands.append(cands)
                    scored, summary = await self._select(cands)
                    for i, s in enumerate(scored):
                        idx = p * n + i
                        # a streamed choice's log-probs come whole with its last chunk (the SDK joins
                        # the chunks' lists, so the total is the same as unstreamed)
                        extras = {"plan_index": s.cand.plan_index, "score": s.score, "verified": s.verified,
                                  "logprobs": self._logprobs(s.cand.decoded)}
                        if self.mode != "sample":  # ranked modes: the chosen texts arrive whole
                            yield self._chunk([self._delta(idx, s.cand.text)])
                        yield self._chunk([self._delta(idx, None if self.chat else "", finish=s.cand.finish_reason,
                                                       extras=extras)],
                                          **({"pass_at_k": summary} if summary and i == len(scored) - 1 else {}))
                    break
            if self.stream_options is not None and self.stream_options.include_usage:
                yield self._chunk([], usage=self._usage(all_cands))
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"
            self.cancel()
            raise
        except Exception as err:
            failure = self.srv.failure(err)
            status = str(failure.status)
            self.cancel()
            yield f"data: {json.dumps(failure.body())}\n\n"
        finally:
            self.observe(status)
