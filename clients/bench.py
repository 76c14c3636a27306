"""Load generator: C concurrent clients for R requests (or S seconds); throughput and latency.

    python -m clients.bench --base-url http://127.0.0.1:8000/v1 --concurrency 32 --duration 60 [--out run.json]

Prints one JSON object: requests sent/ok/failed by status, lost (sent but never answered),
requests/s, completion tokens/s, sequences/s, latency and TTFT percentiles (TTFT with --stream).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter

import httpx

from clients.report import emit_json


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return round(xs[i], 4)


async def run(a) -> dict:
    from ladi_core.tasks import get_task

    prompts = [q.prompt for q in get_task("countdown").questions("test", 200, seed=0)]
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    limits = httpx.Limits(max_connections=a.concurrency + 4, max_keepalive_connections=a.concurrency + 4)
    stats = {"sent": 0, "ok": 0, "status": Counter(), "latency": [], "ttft": [], "tokens": 0, "sequences": 0}
    deadline = time.monotonic() + a.duration if a.duration else None
    budget = a.requests
    rng = random.Random(0)

    async def one(client: httpx.AsyncClient) -> None:
        body = {"messages": [{"role": "user", "content": rng.choice(prompts)}], "n": a.n, "max_tokens": a.max_tokens,
                "temperature": a.temperature, "stream": a.stream}
        if a.mode != "sample":  # LaDi's extension; plain OpenAI servers (vLLM) get a plain body
            body["mode"] = a.mode
        if a.model:
            body["model"] = a.model
        if a.latent_plans:
            body["latent_plans"] = a.latent_plans
        if a.stream:
            body["stream_options"] = {"include_usage": True}
        stats["sent"] += 1
        t0 = time.monotonic()
        try:
            if a.stream:
                async with client.stream("POST", "/chat/completions", json=body, headers=headers) as r:
                    first = None
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        # time to first token: the first chunk that carries text, not the opening role
                        texts = [(c.get("delta") or {}).get("content") for c in chunk.get("choices", ())]
                        if first is None and any(texts):
                            first = time.monotonic() - t0
                        stats["tokens"] += (chunk.get("usage") or {}).get("completion_tokens", 0)
                    status = r.status_code
                    if first is not None:
                        stats["ttft"].append(first)
            else:
                r = await client.post("/chat/completions", json=body, headers=headers)
                status = r.status_code
                if status == 200:
                    stats["tokens"] += r.json()["usage"]["completion_tokens"]
        except httpx.HTTPError as err:
            status = type(err).__name__
        stats["status"][str(status)] += 1
        if status == 200:
            stats["ok"] += 1
            stats["sequences"] += a.n
            stats["latency"].append(time.monotonic() - t0)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal budget
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return
            if deadline is None:
                if budget <= 0:
                    return
                budget -= 1
            await one(client)

    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=a.base_url, timeout=a.timeout, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(a.concurrency)))
    wall = time.monotonic() - t0
    answered = sum(stats["status"].values())
    return {
        "base_url": a.base_url, "concurrency": a.concurrency, "n": a.n, "max_tokens": a.max_tokens,
        "stream": a.stream, "mode": a.mode, "wall_s": round(wall, 2),
        "sent": stats["sent"], "ok": stats["ok"], "status": dict(stats["status"]), "lost": stats["sent"] - answered,
        "server_errors_5xx": sum(v for k, v in stats["status"].items() if k.startswith("5")),
        "requests_per_s": round(stats["ok"] / wall, 3), "sequences_per_s": round(stats["sequences"] / wall, 2),
        "completion_tokens_per_s": round(stats["tokens"] / wall, 1),
        "latency_s": {f"p{q}": percentile(stats["latency"], q) for q in (50, 90, 99)},
        "ttft_s": {f"p{q}": percentile(stats["ttft"], q) for q in (50, 90, 99)} if a.stream else None,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m clients.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key")
    p.add_argument("--model")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=100, help="total requests (ignored with --duration)")
    p.add_argument("--duration", type=float, help="run for this many seconds instead")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--latent-plans", type=int)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--mode", default="sample", choices=["sample", "best_of_n", "pass_at_k"])
    p.add_argument("--stream", action="store_true")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.concurrency < 1:
        raise SystemExit("--concurrency must be >= 1")
    result = asyncio.run(run(a))
    return emit_json(result, a.out)


if __name__ == "__main__":
    main()
