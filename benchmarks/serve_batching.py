"""Batched vs one-at-a-time serving, measured in one run.

    python -m benchmarks.serve_batching [--checkpoint checkpoints/demo-ladi-rl] [--concurrency 32] [--duration 60]

Starts `python -m server` twice on the same checkpoint, first with the default batching and then
with --max-batch-requests 1, drives each with `clients.bench` at the same concurrency, and
prints both results and the throughput ratio as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys

from clients import bench
from clients.report import emit_json

from .servers import free_port, start, stop


def serve(checkpoint: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    return start([sys.executable, "-m", "server", "--checkpoint", checkpoint, "--port", str(port),
                  "--backend", "transformers", "--log-level", "warning", *extra], port, timeout=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_batching", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/demo-ladi-rl")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out")
    a = p.parse_args(argv)
    results = {}
    for name, extra in (("batched", []), ("one_at_a_time", ["--max-batch-requests", "1"])):
        proc, url = serve(a.checkpoint, extra)
        try:
            ns = argparse.Namespace(base_url=url + "/v1", api_key=None, model=None, concurrency=a.concurrency,
                                    requests=0, duration=a.duration, n=a.n, latent_plans=None,
                                    max_tokens=a.max_tokens, temperature=1.0, mode="sample", stream=False,
                                    timeout=300, out=None)
            results[name] = asyncio.run(bench.run(ns))
        finally:
            stop(proc)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    b, o = results["batched"], results["one_at_a_time"]
    summary = {
        "checkpoint": a.checkpoint, "concurrency": a.concurrency, "duration_s": a.duration, "n": a.n,
        "batched": b, "one_at_a_time": o,
        "throughput_ratio_tokens": round(b["completion_tokens_per_s"] / max(o["completion_tokens_per_s"], 1e-9), 2),
        "throughput_ratio_requests": round(b["requests_per_s"] / max(o["requests_per_s"], 1e-9), 2),
    }
    return emit_json(summary, a.out)


if __name__ == "__main__":
    main()
