"""The HTTP routes: OpenAI-compatible endpoints, auth, health, metrics, and the server's lifecycle
(health that tells the truth, draining on SIGTERM, a dead backend failing what is in flight).
A completion request is served by `serving.serve_completion`; this file holds the state it needs."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ladi_core.backends import BackendDead
from ladi_core.checkpoint import git_commit
from ladi_core.generation import Reasoner

from .config import ServerConfig
from .engine import Engine
from .errors import APIError, ShuttingDown, from_failure
from .metrics import ServerMetrics
from .protocol import CheckpointInfo, ModelCard, ModelInfo, ModelList, VersionInfo
from .serving import RequestContext, error_response, serve_completion

HEALTH_POLL_S = 0.5  # how often the backend's liveness is checked


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
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(APIError(err.status_code, str(err.detail), kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err):
        return error_response(APIError(400, str(err), code="invalid_parameter"))

    @app.exception_handler(Exception)
    async def _internal(request, err):
        return error_response(APIError(500, f"internal error: {type(err).__name__}", "server_error"))

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
        ck = srv.reasoner.checkpoint
        prov = ck.config.provenance
        return VersionInfo(version=v, commit=git_commit(), backend=srv.backend_name, checkpoint=CheckpointInfo(
            path=str(ck.path), kind=ck.config.kind, policy=ck.policy.kind if srv.reasoner.is_latent else None,
            made_by=prov.command, commit=prov.commit, metrics=prov.metrics)).model_dump()

    @app.get("/metrics")
    async def metrics():
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        srv.check_auth(request)
        ck = srv.reasoner.checkpoint
        return ModelList(data=[ModelCard(
            id=srv.model_name, created=int(ck.path.stat().st_mtime),
            ladi=ModelInfo(kind=ck.config.kind, policy=ck.policy.kind if ck.policy is not None else None,
                           task=ck.config.task, backend=srv.backend_name))]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await serve_completion(srv, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve_completion(srv, request, chat=False)

    return app
