"""LaDi on vLLM vs LaDi on transformers vs plain vLLM, measured in one run.

    python -m benchmarks.backends [--checkpoint checkpoints/demo-ladi-rl] [--concurrency 16] [--duration 60]

Starts, one after another on the same machine: `python -m server --backend vllm`, `python -m server
--backend transformers` (both on the LaDi checkpoint: M latent plans per request, one text each), and
plain vLLM's OpenAI server on the checkpoint's `decoder/` directory (n texts from the bare prompt).
Each is driven by `clients.bench` with the same concurrency, duration, prompts and sequences per
request (n); prints every result, completion tokens/s, and the ratios as JSON. With `--repeats R`
the servers take turns R times: one run here varies by ~10%, so a ratio is judged by the median
of R ratios, each from one round's back-to-back runs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

from clients import bench
from clients.report import emit_json

from .servers import free_port, start, stop


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
    p.add_argument("--only", help="comma-separated subset of ladi-vllm,ladi-transformers,plain-vllm")
    p.add_argument("--out")
    a = p.parse_args(argv)
    decoder = str(Path(a.checkpoint) / "decoder")
    steps = ["--denoising-steps", str(a.denoising_steps)] if a.denoising_steps else []
    runs = {
        "ladi-vllm": lambda port: [sys.executable, "-m", "server", "--checkpoint", a.checkpoint, "--port", str(port),
                                   "--backend", "vllm", "--vllm-dtype", a.dtype, "--vllm-block-size", str(a.block_size),
                                   "--log-level", "warning", *steps],
        "ladi-transformers": lambda port: [sys.executable, "-m", "server", "--checkpoint", a.checkpoint,
                                           "--port", str(port), "--backend", "transformers", "--log-level", "warning",
                                           *steps],
        "plain-vllm": lambda port: [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", decoder,
                                    "--port", str(port), "--dtype", a.dtype, "--enforce-eager",
                                    "--block-size", str(a.block_size),
                                    "--served-model-name", "plain"],
    }
    chosen = a.only.split(",") if a.only else list(runs)
    rounds: list[dict] = []  # per round: server -> clients.bench result
    for r in range(a.repeats):
        rounds.append({})
        for name in chosen:
            port = free_port()
            proc, url = start(runs[name](port), port)
            try:
                ns = argparse.Namespace(base_url=url + "/v1", api_key=None,
                                        model="plain" if name == "plain-vllm" else None, concurrency=a.concurrency,
                                        requests=0, duration=a.duration, n=a.n, latent_plans=None,
                                        max_tokens=a.max_tokens, temperature=1.0, mode="sample", stream=False,
                                        timeout=300, out=None)
                rounds[r][name] = asyncio.run(bench.run(ns))
            finally:
                stop(proc)
            print(f"round {r + 1}/{a.repeats} {name}: {json.dumps(rounds[r][name])}", flush=True)
    tps_rounds = [{k: v["completion_tokens_per_s"] for k, v in rnd.items()} for rnd in rounds]

    def ratios(x: str, y: str) -> list[float] | None:
        if x not in chosen or y not in chosen:
            return None
        return [round(t[x] / max(t[y], 1e-9), 3) for t in tps_rounds]

    over_plain, over_tf = ratios("ladi-vllm", "plain-vllm"), ratios("ladi-vllm", "ladi-transformers")
    summary = {"checkpoint": a.checkpoint, "denoising_steps": a.denoising_steps, "concurrency": a.concurrency,
               "duration_s": a.duration, "n": a.n, "block_size": a.block_size, "repeats": a.repeats,
               "max_tokens": a.max_tokens, "dtype": a.dtype,
               "completion_tokens_per_s": {k: statistics.median(t[k] for t in tps_rounds) for k in chosen},
               "ladi_vllm_over_plain_vllm": over_plain and statistics.median(over_plain),
               "ladi_vllm_over_ladi_transformers": over_tf and statistics.median(over_tf),
               "ratios_per_round": {"ladi_vllm_over_plain_vllm": over_plain,
                                    "ladi_vllm_over_ladi_transformers": over_tf},
               "rounds": rounds}
    return emit_json(summary, a.out)


if __name__ == "__main__":
    main()
