"""LaDi on vLLM vs LaDi on transformers vs plain vLLM, measured in one run.

    python -m benchmarks.backends [--checkpoint checkpoints/demo-ladi-rl] [--concurrency 16] [--duration 60]

Starts, one after another on the same machine: `python -m server --backend vllm`, `python -m server
--backend transformers` (both on the LaDi checkpoint: M latent plans per request, one text each), and
plain vLLM's OpenAI server on the checkpoint's `decoder/` directory (n texts from the bare prompt),
with the LaDi server's KV block size (`plain-vllm`) and with vLLM's own (`plain-vllm-stock`).
Each is driven by `clients.bench` with the same concurrency, duration, prompts and sequences per
request (n); prints every result, completion tokens/s (the API's usage), the engine's own count
of generated tokens/s (the same vLLM counter in both vLLM servers), sequences/s, and the ratios
as JSON. With `--repeats R` the servers take turns R times: one run here varies by ~10%, so a
ratio is judged by the median of R ratios, each from one round's back-to-back runs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

import httpx

from clients import bench
from clients.report import emit_json

from .servers import free_port, start, stop


def engine_tokens(url: str) -> float | None:
    """The vLLM engine's own count of generated tokens (`vllm:generation_tokens_total`), None
    without a vLLM engine. Counted alike in every vLLM server, stop tokens included, where the
    API's `usage.completion_tokens` differs: vLLM's server counts a sequence's stop token, LaDi's
    (like the transformers backend) does not."""
    total = None
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:generation_tokens_total"):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.backends", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/demo-ladi-rl")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--n", type=int, default=4, help="sequences per request (LaDi: latent plans, one text each)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", help="engine dtype for both vLLM runs")
    p.add_argument("--block-size", type=int, default=32,
                   help="KV-cache block size for both vLLM engines (the LaDi server's CPU default)")
    p.add_argument("--denoising-steps", type=int, help="LaDi servers' --denoising-steps (default: the checkpoint's)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of all servers in turn; figures are medians, ratios paired within a round")
    p.add_argument("--only", help="comma-separated subset of ladi-vllm,ladi-transformers,plain-vllm,plain-vllm-stock")
    p.add_argument("--out")
    a = p.parse_args(argv)
    decoder = str(Path(a.checkpoint) / "decoder")
    steps = ["--denoising-steps", str(a.denoising_steps)] if a.denoising_steps else []

    def plain(port: int) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", decoder, "--port", str(port),
                "--dtype", a.dtype, "--enforce-eager", "--served-model-name", "plain"]

    runs = {
        "ladi-vllm": lambda port: [sys.executable, "-m", "server", "--checkpoint", a.checkpoint, "--port", str(port),
                                   "--backend", "vllm", "--vllm-dtype", a.dtype, "--vllm-block-size", str(a.block_size),
                                   "--log-level", "warning", *steps],
        "ladi-transformers": lambda port: [sys.executable, "-m", "server", "--checkpoint", a.checkpoint,
                                           "--port", str(port), "--backend", "transformers", "--log-level", "warning",
                                           *steps],
        "plain-vllm": lambda port: plain(port) + ["--block-size", str(a.block_size)],
        "plain-vllm-stock": plain,  # stock `vllm serve` settings: vLLM-CPU's own 128-token KV blocks
    }
    chosen = a.only.split(",") if a.only else list(runs)
    if set(chosen) - set(runs):
        p.error(f"--only: unknown server(s) {sorted(set(chosen) - set(runs))}; choose from {list(runs)}")
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    rounds: list[dict] = []  # per round: server -> clients.bench result (+ engine_tokens_per_s)
    for r in range(a.repeats):
        rounds.append({})
        for name in chosen:
            port = free_port()
            proc, url = start(runs[name](port), port)
            try:
                ns = argparse.Namespace(base_url=url + "/v1", api_key=None,
                                        model="plain" if name.startswith("plain") else None, concurrency=a.concurrency,
                                        requests=0, duration=a.duration, n=a.n, latent_plans=None,
                                        max_tokens=a.max_tokens, temperature=1.0, mode="sample", stream=False,
                                        timeout=300, out=None)
                before = engine_tokens(url)
                res = asyncio.run(bench.run(ns))
                after = engine_tokens(url)
                res["engine_tokens_per_s"] = None if before is None else round((after - before) / res["wall_s"], 1)
                rounds[r][name] = res
            finally:
                stop(proc)
            print(f"round {r + 1}/{a.repeats} {name}: {json.dumps(rounds[r][name])}", flush=True)

    def summary_of(metric: str) -> dict:
        per_round = [{k: v[metric] for k, v in rnd.items()} for rnd in rounds]
        medians = {k: statistics.median(t[k] for t in per_round) if per_round[0][k] is not None else None
                   for k in chosen}
        ratios = {}
        for x, y in (("ladi-vllm", "plain-vllm"), ("ladi-vllm", "plain-vllm-stock"),
                     ("ladi-vllm", "ladi-transformers")):
            if x in chosen and y in chosen and medians[x] is not None and medians[y] is not None:
                each = [round(t[x] / max(t[y], 1e-9), 3) for t in per_round]
                ratios[f"{x}/{y}"] = {"median": statistics.median(each), "per_round": each}
        return {"median": medians, "ratios": ratios}

    summary = {"checkpoint": a.checkpoint, "denoising_steps": a.denoising_steps, "concurrency": a.concurrency,
               "duration_s": a.duration, "n": a.n, "block_size": a.block_size, "repeats": a.repeats,
               "max_tokens": a.max_tokens, "dtype": a.dtype,
               "completion_tokens_per_s": summary_of("completion_tokens_per_s"),
               "engine_tokens_per_s": summary_of("engine_tokens_per_s"),
               "sequences_per_s": summary_of("sequences_per_s"),
               "rounds": rounds}
    return emit_json(summary, a.out)


if __name__ == "__main__":
    main()
