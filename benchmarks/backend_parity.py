"""Does serving through vLLM change the answers? pass@k through the API on both backends.

    python -m benchmarks.backend_parity [--checkpoint checkpoints/demo-ladi-rl] [--problems 300] [--k 1,8]

Starts `python -m server` with `--backend vllm`, then with `--backend transformers`, on the same
checkpoint; runs `clients.eval` (mode=pass_at_k, the same questions and seeds) against each; prints
both pass@k tables and, for pass@1, the paired difference over questions with its standard error.
Sampling differs between the engines (their random streams are their own), so agreement means a
difference within about two standard errors.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys

from clients import eval as ceval
from clients.report import emit_json

from .servers import free_port, start, stop


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.backend_parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/demo-ladi-rl")
    p.add_argument("--problems", type=int, default=300)
    p.add_argument("--k", default="1,8")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out")
    a = p.parse_args(argv)
    results = {}
    for backend in ("vllm", "transformers"):
        port = free_port()
        proc, url = start([sys.executable, "-m", "server", "--checkpoint", a.checkpoint, "--port", str(port),
                           "--backend", backend, "--vllm-dtype", "float32", "--log-level", "warning"], port)
        try:
            ns = argparse.Namespace(base_url=url + "/v1", api_key="none", model=None, task="countdown", verifier=None,
                                    problems=a.problems, k=a.k, temperature=1.0, max_tokens=96,
                                    concurrency=a.concurrency, seed=1234, per_question=True)
            results[backend] = asyncio.run(ceval.run(ns))
        finally:
            stop(proc)
    n = results["vllm"]["samples"]
    diffs = [(x - y) / n for x, y in zip(results["vllm"].pop("correct_per_question"),
                                        results["transformers"].pop("correct_per_question"))]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    summary = {"checkpoint": a.checkpoint, "questions": a.problems, "samples_per_question": n, "results": results,
               "pass@1_difference_vllm_minus_transformers": round(mean, 4), "standard_error": round(se, 4),
               "within_two_standard_errors": abs(mean) <= 2 * se}
    return emit_json(summary, a.out)


if __name__ == "__main__":
    main()
