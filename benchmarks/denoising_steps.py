"""How many denoising steps does a plan need? pass@1 at several step counts, paired.

    python -m benchmarks.denoising_steps [--checkpoint checkpoints/demo-ladi-rl] [--steps 20,10,5,3]

Every setting starts from the same initial noise (same seeds), so the per-question difference to
the first setting is paired and its standard error small. Serving cost grows linearly with the
steps (the policy pass is `steps` denoiser calls), so this says how far `--denoising-steps` can
be lowered before the answers change.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from clients.report import emit_json
from ladi_core.backends import SamplingParams
from ladi_core.generation import Reasoner
from ladi_core.tasks import get_task
from training.eval import evaluate


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.denoising_steps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/demo-ladi-rl")
    p.add_argument("--steps", default="20,10,5,3", help="comma-separated; the first is the reference")
    p.add_argument("--problems", type=int, default=300)
    p.add_argument("--plans", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    reasoner = Reasoner.from_checkpoint(a.checkpoint)
    if not reasoner.is_latent:
        raise SystemExit(f"{a.checkpoint} is a token-level checkpoint: it has no denoising steps")
    task = get_task("countdown")
    questions = task.questions("test", a.problems, seed=0)
    params = SamplingParams(temperature=1.0, max_tokens=96, seed=a.seed)
    rows, reference = {}, None
    for steps in (int(s) for s in a.steps.split(",")):
        t0 = time.time()
        records = evaluate(reasoner, questions, task.verifier, plans=a.plans, samples_per_plan=1, params=params,
                           progress=False, steps=steps)
        p1 = [r["c"] / r["n"] for r in records]
        row = {"pass@1": round(100 * statistics.fmean(p1), 2),
               "se": round(100 * statistics.stdev(p1) / len(p1) ** 0.5, 2), "wall_s": round(time.time() - t0, 1)}
        if reference is None:
            reference = p1
        else:
            d = [x - y for x, y in zip(p1, reference)]
            row["paired_diff"] = round(100 * statistics.fmean(d), 2)
            row["paired_se"] = round(100 * statistics.stdev(d) / len(d) ** 0.5, 2)
        rows[steps] = row
        print(f"steps {steps}: {row}", flush=True)
    return emit_json({"checkpoint": a.checkpoint, "problems": a.problems, "plans": a.plans, "by_steps": rows}, a.out)


if __name__ == "__main__":
    main()
