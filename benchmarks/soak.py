"""Soak run: many concurrent clients of mixed modes against `python -m server` for minutes.

    python -m benchmarks.soak --checkpoint checkpoints/demo-ladi-rl [--clients 32] [--duration-s 600]
        [--warmup-s 60] [--backend auto] [--out results/soak/soak.json]

Each client cycles through sample, best_of_n, pass_at_k, streaming, and a stream it drops after
its first chunks (the server must abort those rows and carry on). Prints one JSON object:
requests by kind and status, 5xx count, lost requests (a connection error, or a stream that ended
with neither [DONE] nor an error event), p50/p99 latency, and the server's RSS (its own process,
and with the engine's processes) at the end of warm-up and at the end, with the growth between.
Targets: zero 5xx, zero lost, RSS growth under 10% after warm-up. Loopback only; bounded in time.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from benchmarks.servers import free_port, start, stop
from clients.bench import percentile
from clients.report import emit_json

KINDS = ("sample", "best_of_n", "pass_at_k", "stream", "disconnect")


def rss(pid: int) -> tuple[int, int]:
    """(the server process's RSS, the RSS of it and every process below it), in bytes."""
    proc = psutil.Process(pid)
    own = proc.memory_info().rss
    total = own
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return own, total


async def client_loop(client: httpx.AsyncClient, cid: int, questions, deadline: float, stats: dict,
                      max_tokens: int) -> None:
    rng = random.Random(cid)
    i = cid
    while time.monotonic() < deadline:
        kind = KINDS[i % len(KINDS)]
        i += 1
        q = rng.choice(questions)
        body: dict = {"messages": [{"role": "user", "content": q.prompt}], "max_tokens": max_tokens, "n": 2}
        if kind == "best_of_n":
            body.update(mode="best_of_n", best_of=4)
        elif kind == "pass_at_k":
            body.update(mode="pass_at_k", n=4, reference=q.reference)
        t0 = time.monotonic()
        outcome = await one(client, kind, body)
        took = time.monotonic() - t0
        stats["by_kind"][f"{kind} {outcome}"] += 1
        stats["status"][outcome] += 1
        if outcome == "200":
            stats["latency"].append(took)
        await asyncio.sleep(rng.uniform(0, 0.05))


async def one(client: httpx.AsyncClient, kind: str, body: dict) -> str:
    """The request's outcome: its status, 'dropped' (a client that left on purpose), or 'lost'."""
    try:
        if kind not in ("stream", "disconnect"):
            r = await client.post("/v1/chat/completions", json=body)
            return str(r.status_code)
        async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                return str(r.status_code)
            last, chunks = "", 0
            async for line in r.aiter_lines():
                if not line:
                    continue
                last, chunks = line, chunks + 1
                if kind == "disconnect" and chunks >= 2:
                    return "dropped"  # leaving the block closes the connection mid-stream
            if last == "data: [DONE]":
                return "200"
            if '"error"' in last:
                return "stream-error"
            return "lost"
    except httpx.HTTPError:
        return "lost"


async def drive(url: str, pid: int, a) -> dict:
    from ladi_core.tasks import get_task

    questions = get_task("countdown").questions("test", 200, seed=0)
    stats = {"by_kind": Counter(), "status": Counter(), "latency": []}
    limits = httpx.Limits(max_connections=a.clients + 4, max_keepalive_connections=a.clients + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(120.0)) as client:
        start_t = time.monotonic()
        deadline = start_t + a.duration_s
        loops = [asyncio.create_task(client_loop(client, c, questions, deadline, stats, a.max_tokens))
                 for c in range(a.clients)]
        await asyncio.sleep(min(a.warmup_s, a.duration_s))
        warm = rss(pid)
        warm_requests = sum(stats["status"].values())
        samples = []
        while not all(t.done() for t in loops):
            await asyncio.sleep(5)
            samples.append((round(time.monotonic() - start_t), *rss(pid)))
        await asyncio.gather(*loops)
        end = rss(pid)
        elapsed = time.monotonic() - start_t
    status = stats["status"]
    total = sum(status.values())
    return {
        "clients": a.clients, "duration_s": round(elapsed, 1), "warmup_s": a.warmup_s, "backend": a.backend,
        "checkpoint": a.checkpoint, "requests": total, "requests_after_warmup": total - warm_requests,
        "requests_per_s": round(total / elapsed, 2),
        "status": dict(sorted(status.items())), "by_kind": dict(sorted(stats["by_kind"].items())),
        "5xx": sum(v for k, v in status.items() if k.startswith("5")),
        "lost": status.get("lost", 0), "stream_errors": status.get("stream-error", 0),
        "latency_p50_s": percentile(stats["latency"], 50), "latency_p99_s": percentile(stats["latency"], 99),
        "rss_server_mib": {"warm": round(warm[0] / 2**20, 1), "end": round(end[0] / 2**20, 1)},
        "rss_with_engine_mib": {"warm": round(warm[1] / 2**20, 1), "end": round(end[1] / 2**20, 1)},
        "rss_growth_after_warmup": {"server": round(end[0] / warm[0] - 1, 4),
                                    "with_engine": round(end[1] / warm[1] - 1, 4)},
        "rss_samples_mib": [(t, round(o / 2**20, 1), round(w / 2**20, 1)) for t, o, w in samples],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/demo-ladi-rl")
    p.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--warmup-s", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.clients < 1 or a.duration_s <= 0 or a.warmup_s < 0:
        p.error("--clients must be >= 1, --duration-s > 0 and --warmup-s >= 0")
    port = free_port()
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(Path(a.out).with_suffix(".server.log") if a.out else os.devnull, "w") as log:
        proc, url = start([sys.executable, "-m", "server", "--checkpoint", a.checkpoint, "--backend", a.backend,
                           "--port", str(port), "--log-level", "warning"], port, timeout=300, log=log)
        try:
            result = asyncio.run(drive(url, proc.pid, a))
            result["server_alive_after"] = proc.poll() is None and httpx.get(url + "/health").status_code == 200
        finally:
            stop(proc)
    result["targets_met"] = (result["5xx"] == 0 and result["lost"] == 0
                             and result["rss_growth_after_warmup"]["server"] < 0.10
                             and result["rss_growth_after_warmup"]["with_engine"] < 0.10)
    return emit_json(result, a.out)


if __name__ == "__main__":
    main()
