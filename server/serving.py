"""Serving one completion request, under the thin routes of `app.py`: parse and validate it
(`validate.plan_request`), queue one engine job per prompt, wait for the jobs within the request's
deadline, choose the returned candidates (`modes.select`) and shape the OpenAI response or stream
from `protocol.py`'s models. A request in flight is a `RequestContext`, which the server can end
early with a clear error (a dead backend, the end of a shutdown's grace)."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from ladi_core.seeding import question_seed

from .engine import Job, QueueFull
from .errors import APIError, DeadlineExceeded
from .modes import select, spread
from .protocol import (
    ChatChoice,
    ChatChoiceMessage,
    ChatChunkChoice,
    ChatCompletionRequest,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    LadiInfo,
    PassAtK,
    Usage,
    new_id,
    now,
)
from .validate import WorkPlan, plan_request

if TYPE_CHECKING:
    from .app import Server


class ClientGone(Exception):
    pass


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def serve_completion(srv: Server, request: Request, chat: bool) -> Response:
    """/v1/chat/completions (chat=True) and /v1/completions: one request, start to end."""
    arrival = time.monotonic()
    mode = "unknown"
    try:
        srv.check_auth(request)
        req = parse(ChatCompletionRequest if chat else CompletionRequest,
                    await read_json(request, srv.cfg.limits.max_body_bytes))
        mode = req.mode
        srv.admit()
        plan = plan_request(srv.cfg, srv.reasoner, req, srv.model_name)
    except APIError as err:
        srv.metrics.requests.labels(mode, str(err.status)).inc()
        return error_response(err)

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
        return error_response(APIError(429, str(err), "rate_limit_error", code="queue_full"))
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
        return error_response(failure)
    ctx.observe("200")
    return JSONResponse(body)


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
    def _chunk(self, choices: list, usage: Usage | None = None, pass_at_k: dict | None = None) -> str:
        chunk = CompletionChunk(id=self.id, object="chat.completion.chunk" if self.chat else "text_completion",
                                created=self.created, model=self.srv.model_name, choices=choices)
        if usage is not None:
            chunk.usage = usage
        if pass_at_k is not None:
            chunk.pass_at_k = PassAtK(**pass_at_k)
        return chunk.sse()

    def _delta(self, index: int, text: str | None = None, role: bool = False, finish=None, extras=None):
        """One choice's piece of a chunk: new text, the opening role (chat), or its end."""
        fields = {"index": index, "logprobs": None, "finish_reason": finish, **(extras or {})}
        if self.chat:
            delta = ChatDelta(role="assistant") if role else ChatDelta()
            if text is not None:
                delta.content = text
            return ChatChunkChoice(delta=delta, **fields)
        return CompletionChunkChoice(text=text or "", **fields)

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
                                          pass_at_k=summary if summary and i == len(scored) - 1 else None)
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
