"""A generation demo on a checkpoint: questions -> latent plans -> decoded, verified texts.

    python -m training.demo [--checkpoint checkpoints/demo-ladi-rl] [--questions 3] [--plans 4] [--samples-per-plan 2]
"""
from __future__ import annotations

import argparse
import time

from ladi_core.backends import SamplingParams
from ladi_core.checkpoint import exit_on_user_error
from ladi_core.generation import Reasoner
from ladi_core.tasks import get_task

DEFAULT_CHECKPOINT = "checkpoints/demo-ladi-rl"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--task", default="countdown")
    p.add_argument("--verifier")
    p.add_argument("--prompt", help="a question of your own instead of held-out task questions")
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--plans", type=int, default=4)
    p.add_argument("--samples-per-plan", type=int, default=2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t0 = time.time()
    reasoner = Reasoner.from_checkpoint(args.checkpoint)
    cfg = reasoner.checkpoint.config
    print(f"loaded {args.checkpoint} ({cfg.kind}, made by: {cfg.provenance.command}) in {time.time() - t0:.1f}s")
    task = get_task(args.task, args.verifier)
    questions = [None] if args.prompt else task.questions("test", args.questions, seed=args.seed)
    prompts = [args.prompt] if args.prompt else [q.prompt for q in questions]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    t0 = time.time()
    gens = reasoner.generate(prompts, args.plans, args.samples_per_plan, params)
    elapsed = time.time() - t0
    for prompt, q, g in zip(prompts, questions, gens):
        print(f"\n=== {prompt}")
        for c in g.completions:
            verdict = ""
            if q is not None:
                r = task.verifier.score(c.text, q.reference)
                verdict = "correct" if r.correct else "wrong"
            plan = "-" if c.plan_index is None else c.plan_index
            print(f"--- plan {plan} [{verdict}] {c.text!r}")
    n = sum(len(g.completions) for g in gens)
    print(f"\n{n} completions in {elapsed:.2f}s")


if __name__ == "__main__":
    exit_on_user_error(main)
