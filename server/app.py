"""HTTP layer: OpenAI-compatible routes, auth, limits and error shapes. Everything model-related
happens in the engine; this file turns requests into engine jobs and results into responses."""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ladi_core.backends import SamplingParams
from ladi_core.checkpoint import git_commit
from ladi_core.generation import Reasoner

from .config import ServerConfig
from .engine import Engine, Job, QueueFull
from .metrics import ServerMetrics
from .modes import BadRequest, Layout, layout, resolve_verifier, select
from .protocol import ChatCompletionRequest, CompletionRequest, LadiParams, error_body, new_id, now


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class ClientGone(Exception):
    pass


def _error(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


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
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(x) for x in first["loc"]) or None
        raise APIError(400, f"invalid parameter {param}: {first['msg']}", param=param,
                       code="invalid_parameter") from None


class Server:
    """The app's state: config, reasoner, engine and metrics, plus request validation."""

    def __init__(self, cfg: ServerConfig, reasoner: Reasoner, backend_name: str):
        self.cfg = cfg
        self.reasoner = reasoner
        self.model_name = cfg.served_model_name or reasoner.checkpoint.path.name
        self.metrics = ServerMetrics(self.model_name)
        self.metrics.info.labels(self.model_name, reasoner.checkpoint.config.kind, backend_name).set(1)
        if hasattr(reasoner.backend, "prometheus_registry"):
            self.metrics.backend_registries.append(reasoner.backend.prometheus_registry())
        self.engine = Engine(reasoner, self.metrics, max_queue=cfg.max_queue,
                             max_batch_requests=cfg.max_batch_requests,
                             max_batch_sequences=cfg.max_batch_sequences, batch_window_ms=cfg.batch_window_ms)
        self.backend_name = backend_name
        self.task = reasoner.checkpoint.config.task
        self.max_positions = reasoner.backend.max_model_len

    # --- validation --------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.cfg.api_key}":
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    def sampling(self, req: LadiParams) -> tuple[SamplingParams, dict]:
        lim = self.cfg.limits
        if not 0.0 <= req.temperature <= 2.0:
            raise BadRequest("temperature must be between 0 and 2", "temperature")
        if not 0.0 < req.top_p <= 1.0:
            raise BadRequest("top_p must be in (0, 1]", "top_p")
        max_tokens = req.max_completion_tokens or req.max_tokens or min(self.cfg.default_max_tokens, lim.max_tokens)
        if not 1 <= max_tokens <= lim.max_tokens:
            raise BadRequest(f"max_tokens must be between 1 and {lim.max_tokens}, got {max_tokens}", "max_tokens")
        if req.seed is not None and not 0 <= req.seed < 2**63:
            raise BadRequest("seed must be in [0, 2^63)", "seed")
        stop = req.stop_list()
        if len(stop) > lim.max_stop_strings or any(not s or len(s) > 64 for s in stop):
            raise BadRequest(f"stop: at most {lim.max_stop_strings} non-empty strings of up to 64 characters",
                             "stop")
        if req.denoising_steps is not None and not 1 <= req.denoising_steps <= lim.max_denoising_steps:
            raise BadRequest(f"denoising_steps must be between 1 and {lim.max_denoising_steps}", "denoising_steps")
        if req.guidance_scale is not None and not 0.0 <= req.guidance_scale <= 20.0:
            raise BadRequest("guidance_scale must be between 0 and 20", "guidance_scale")
        if req.diversity is not None and not 0.0 <= req.diversity <= 10.0:
            raise BadRequest("diversity must be between 0 and 10", "diversity")
        steps = req.denoising_steps or self.cfg.denoising_steps
        overrides = {k: v for k, v in (("steps", steps), ("guidance", req.guidance_scale),
                                       ("diversity", req.diversity)) if v is not None}
        # token log-probs only where they rank candidates: computing them costs vLLM ~20% throughput
        params = SamplingParams(req.temperature, req.top_p, max_tokens, req.seed, tuple(stop),
                                logprobs=req.mode == "best_of_n")
        return params, overrides

    def prompt_ids(self, text: str, max_tokens: int) -> list[int]:
        ids = self.reasoner.tokenizer(text, add_special_tokens=False).input_ids
        lim = self.cfg.limits.max_prompt_tokens
        if len(ids) > lim:
            raise BadRequest(f"the prompt has {len(ids)} tokens; the limit is {lim}", "messages")
        if not ids:
            raise BadRequest("the prompt is empty", "prompt")
        if self.max_positions is not None:
            plan = self.reasoner.checkpoint.codec.cfg.latent_tokens + 2 if self.reasoner.is_latent else 0
            if len(ids) + plan + max_tokens > self.max_positions:
                raise BadRequest(f"prompt ({len(ids)} tokens) + plan ({plan}) + max_tokens ({max_tokens}) exceeds "
                                 f"the model's context of {self.max_positions}", "max_tokens")
        return ids


def create_app(cfg: ServerConfig, reasoner: Reasoner, backend_name: str = "transformers",
               owns_reasoner: bool = False) -> FastAPI:
    """owns_reasoner: shut the backend down with the app (the vLLM engine lives in processes of its
    own, and uvicorn ends the process by re-raising SIGTERM, so this is the last chance)."""
    srv = Server(cfg, reasoner, backend_name)

    @asynccontextmanager
    async def lifespan(app):
        srv.engine.start()
        yield
        srv.engine.stop()
        close = getattr(reasoner.backend, "close", None)
        if owns_reasoner and close is not None:
            close()

    app = FastAPI(title="LaDi reasoning server", lifespan=lifespan)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return _error(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(err.status_code, str(err.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err):
        return _error(400, str(err), "invalid_request_error", code="invalid_parameter")

    @app.exception_handler(Exception)
    async def _internal(request, err):
        return _error(500, f"internal error: {type(err).__name__}", "server_error")

    @app.get("/health")
    async def health():
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
            "ladi": {"kind": ck.config.kind, "task": ck.config.task, "backend": srv.backend_name}}]}

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
            if req.model not in (None, srv.model_name):
                raise APIError(404, f"model {req.model!r} does not exist; this server serves {srv.model_name!r}",
                               "not_found_error", "model", "model_not_found")
            params, overrides = srv.sampling(req)
            lay = layout(req, srv.reasoner.is_latent, cfg.limits)
            rule, verifier = resolve_verifier(req.verifier, srv.task)
            if req.mode == "pass_at_k" and (req.reference is None or verifier is None):
                raise BadRequest("pass_at_k needs a `reference` and a verifier", "reference")
            if chat:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                texts = [srv.reasoner.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                    add_generation_prompt=True)]
            else:
                texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
                if not texts or not all(isinstance(t, str) for t in texts):
                    raise BadRequest("prompt must be a string or a non-empty list of strings", "prompt")
            ids = [srv.prompt_ids(t, params.max_tokens) for t in texts]
        except BadRequest as err:
            srv.metrics.requests.labels(mode, "400").inc()
            return _error(400, str(err), "invalid_request_error", err.param, "invalid_parameter")
        except APIError as err:
            srv.metrics.requests.labels(mode, str(err.status)).inc()
            return _error(err.status, err.message, err.type, err.param, err.code)

        loop = asyncio.get_running_loop()
        jobs = [Job(i, lay.plans, lay.samples_per_plan, params, loop, overrides, req.stream, req.mode) for i in ids]
        try:
            for job in jobs:
                srv.engine.submit(job)
        except QueueFull as err:
            for job in jobs:
                job.cancel()
            srv.metrics.requests.labels(mode, "429").inc()
            return _error(429, str(err), "rate_limit_error", code="queue_full")
        srv.metrics.prompt_tokens.inc(sum(len(i) for i in ids))
        ctx = RequestContext(srv, req, jobs, lay, rule, verifier, chat, arrival)
        if req.stream:
            return StreamingResponse(ctx.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            body = await ctx.complete(request)
        except ClientGone:
            srv.metrics.requests.labels(mode, "499").inc()
            return Response(status_code=499)
        except BadRequest as err:
            srv.metrics.requests.labels(mode, "400").inc()
            return _error(400, str(err), "invalid_request_error", err.param, "invalid_parameter")
        except Exception as err:  # the engine reported a failure for this batch
            srv.metrics.requests.labels(mode, "500").inc()
            return _error(500, f"generation failed: {type(err).__name__}: {err}", "server_error")
        ctx.observe("200")
        return JSONResponse(body)

    return app


class RequestContext:
    """One accepted request: waits for its jobs and shapes the OpenAI response (or stream)."""

    def __init__(self, srv: Server, req: LadiParams, jobs: list[Job], lay: Layout, rule, verifier, chat: bool,
                 arrival: float):
        self.srv, self.req, self.jobs, self.lay = srv, req, jobs, lay
        self.rule, self.verifier, self.chat, self.arrival = rule, verifier, chat, arrival
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.object = "chat.completion" if chat else "text_completion"

    def observe(self, status: str) -> None:
        m = self.srv.metrics
        m.requests.labels(self.req.mode, status).inc()
        m.e2e.labels(self.req.mode).observe(time.monotonic() - self.arrival)
        firsts = [j.first_token_at for j in self.jobs if j.first_token_at is not None]
        if firsts:
            m.ttft.observe(min(firsts) - self.arrival)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def _wait(self, job: Job, request: Request | None):
        while True:
            try:
                ev = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    raise ClientGone from None
                continue
            if ev[0] == "done":
                return ev[1]
            if ev[0] == "error":
                raise ev[1]

    async def _select(self, cands):
        return await asyncio.to_thread(select, self.req.mode, cands, self.lay, self.rule, self.verifier,
                                       self.req.reference)

    def _choice(self, index: int, scored) -> dict:
        c = scored.cand
        extras = {"plan_index": c.plan_index, "score": scored.score, "verified": scored.verified}
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason, "logprobs": None, **extras}
        return {"index": index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None, **extras}

    def _usage(self, all_cands) -> dict:
        prompt = sum(len(j.prompt_ids) for j in self.jobs)
        completion = sum(len(c.decoded.token_ids) for cands in all_cands for c in cands)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _ladi(self) -> dict:
        return {"mode": self.req.mode, "latent_plans": self.lay.plans if self.srv.reasoner.is_latent else None,
                "samples_per_plan": self.lay.samples_per_plan,
                "latent_seconds": round(max(j.latent_s for j in self.jobs), 4),
                "decode_seconds": round(max(j.decode_s for j in self.jobs), 4)}

    async def complete(self, request: Request) -> dict:
        choices, summaries, all_cands = [], [], []
        try:
            for job in self.jobs:
                cands = await self._wait(job, request)
                all_cands.append(cands)
                scored, summary = await self._select(cands)
                base = len(choices)
                choices.extend(self._choice(base + i, s) for i, s in enumerate(scored))
                if summary is not None:
                    summaries.append(summary)
        except BaseException:
            self.cancel()
            raise
        body: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created,
                                "model": self.srv.model_name, "choices": choices, "usage": self._usage(all_cands),
                                "ladi": self._ladi()}
        if summaries:
            body["pass_at_k"] = summaries[0] if len(summaries) == 1 else summaries
        return body

    # --- streaming -------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], usage: dict | None = None, **extra) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.srv.model_name,
                "choices": choices, **extra}
        if usage is not None:
            body["usage"] = usage
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

    async def stream(self):
        n = self.lay.choices
        status = "200"
        all_cands = []
        try:
            if self.chat:
                yield self._chunk([self._delta(i, "", role=True) for i in range(n * len(self.jobs))])
            for p, job in enumerate(self.jobs):
                # live deltas in sample mode: candidate index -> choice index
                order = [] if self.req.mode != "sample" else \
                    [m * self.lay.samples_per_plan + s for s in range(self.lay.samples_per_plan)
                     for m in range(self.lay.plans)][:n]
                live = {cand: p * n + i for i, cand in enumerate(order)}
                while True:
                    ev = await job.events.get()
                    if ev[0] == "delta":
                        if ev[1] in live:
                            yield self._chunk([self._delta(live[ev[1]], ev[2])])
                        continue
                    if ev[0] == "error":
                        raise ev[1]
                    cands = ev[1]
                    all_cands.append(cands)
                    scored, summary = await self._select(cands)
                    for i, s in enumerate(scored):
                        idx = p * n + i
                        extras = {"plan_index": s.cand.plan_index, "score": s.score, "verified": s.verified}
                        if self.req.mode != "sample":  # ranked modes: the chosen texts arrive whole
                            yield self._chunk([self._delta(idx, s.cand.text)])
                        yield self._chunk([self._delta(idx, None if self.chat else "", finish=s.cand.finish_reason,
                                                       extras=extras)],
                                          **({"pass_at_k": summary} if summary and i == len(scored) - 1 else {}))
                    break
            opts = self.req.stream_options
            if opts is not None and opts.include_usage:
                yield self._chunk([], usage=self._usage(all_cands))
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"
            self.cancel()
            raise
        except BadRequest as err:
            status = "400"
            yield f"data: {json.dumps(error_body(str(err), 'invalid_request_error', err.param))}\n\n"
        except Exception as err:
            status = "500"
            self.cancel()
            yield f"data: {json.dumps(error_body(f'generation failed: {type(err).__name__}', 'server_error'))}\n\n"
        finally:
            self.observe(status)
