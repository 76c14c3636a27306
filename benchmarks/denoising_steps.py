"""How many denoising steps does a plan need? pass@1 at several step counts, paired.

    python -m benchmarks.denoising_steps [--checkpoint checkpoints/demo-ladi-rl] [--steps 20,10,5,3] [--adopt 5]

Every setting starts from the same initial noise (same seeds), so the per-question difference to
the first setting is paired and its standard error small. Serving cost grows linearly with the
steps (the policy pass is `steps` denoiser calls), so this says how far `--denoising-steps` can
be lowered before the answers change. `--adopt N` then makes N the checkpoint's default (what the
server uses when a request names no steps), refusing when N lost more than two paired standard
errors against the reference, and records this measurement in the checkpoint's provenance.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from clients.report import emit_json
from ladi_core.backends import SamplingParams
from ladi_core.checkpoint import command_line, set_sampler_default
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
    p.add_argument("--adopt", type=int, help="make this step count (one of --steps) the checkpoint's default")
    p.add_argument("--out")
    a = p.parse_args(argv)
    settings = [int(s) for s in a.steps.split(",")]
    if a.adopt is not None and a.adopt not in settings[1:]:
        raise SystemExit(f"--adopt {a.adopt} must be one of the compared --steps after the reference {settings[0]}")
    if a.threads:
        torch.set_num_threads(a.threads)
    reasoner = Reasoner.from_checkpoint(a.checkpoint)
    if not reasoner.is_latent:
        raise SystemExit(f"{a.checkpoint} is a token-level checkpoint: it has no denoising steps")
    task = get_task("countdown")
    questions = task.questions("test", a.problems, seed=0)
    params = SamplingParams(temperature=1.0, max_tokens=96, seed=a.seed)
    rows, reference = {}, None
    for steps in settings:
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
    summary = {"checkpoint": a.checkpoint, "problems": a.problems, "plans": a.plans, "by_steps": rows}
    if a.adopt is not None:
        row = rows[a.adopt]
        if row["paired_diff"] < -2 * row["paired_se"]:
            raise SystemExit(f"not adopting {a.adopt} steps: pass@1 {row['paired_diff']:+.2f} +- {row['paired_se']} "
                             f"points against {settings[0]} steps")
        set_sampler_default(a.checkpoint, {"command": command_line("benchmarks.denoising_steps", argv),
                                           "reference_steps": settings[0], **summary}, steps=a.adopt)
        print(f"{a.checkpoint}: default denoising steps now {a.adopt}", flush=True)
    return emit_json(summary, a.out)


if __name__ == "__main__":
    main()
