"""The cost of thinking: tokens written per answer and wall time per question, chain-of-thought
text against continuous thoughts, measured in one run with the checkpoints taking turns.

    python -m benchmarks.thinking_cost [--checkpoint checkpoints/demo-token --checkpoint checkpoints/demo-coconut]
        [--questions 64] [--samples 64] [--rounds 3] [--out results/rl-demo/thinking-cost.json]

Each round generates `samples` texts (temperature 1, seed 1234) for the same held-out questions
with every checkpoint in turn, on the transformers backend, batches of 32 questions as
`training.eval` does; a recurrent checkpoint's time includes computing its thoughts. Reports the
median over rounds of seconds per question, and tokens per text (the same every round).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ladi_core.backends import SamplingParams
from ladi_core.generation import Reasoner
from ladi_core.tasks import get_task
from training.eval import evaluate


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.thinking_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append")
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="results/rl-demo/thinking-cost.json")
    a = p.parse_args(argv)
    ckpts = a.checkpoint or ["checkpoints/demo-token", "checkpoints/demo-coconut"]
    task = get_task("countdown")
    qs = task.questions("test", a.questions, seed=0)
    params = SamplingParams(1.0, 1.0, 96, seed=1234)
    reasoners = {c: Reasoner.from_checkpoint(c) for c in ckpts}
    times: dict[str, list[float]] = {c: [] for c in ckpts}
    tokens: dict[str, float] = {}
    for _ in range(a.rounds):
        for c, r in reasoners.items():
            plans, spp = (a.samples, 1) if r.distinct_plans else (1, a.samples)
            t0 = time.perf_counter()
            recs = evaluate(r, qs, task.verifier, plans=plans, samples_per_plan=spp, params=params, progress=False)
            times[c].append((time.perf_counter() - t0) / len(qs))
            tokens[c] = statistics.fmean(x["tokens"] for x in recs)
    out = {"args": vars(a), "results": {c: {"tokens_per_text": round(tokens[c], 2),
                                            "s_per_question_median": round(statistics.median(times[c]), 4),
                                            "s_per_question_rounds": [round(t, 4) for t in times[c]]}
                                        for c in ckpts}}
    if len(ckpts) == 2:
        base, other = ckpts
        out["ratio_time"] = round(out["results"][other]["s_per_question_median"]
                                  / out["results"][base]["s_per_question_median"], 3)
        out["ratio_tokens"] = round(tokens[other] / tokens[base], 3)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
