"""pass@k through the API: held-out task questions sent with mode=pass_at_k, verified by the server.

    python -m clients.eval --base-url http://127.0.0.1:8000/v1 --task countdown --problems 200 --k 1,8

On the same checkpoint it measures what `python -m training.eval` does (max(k) plans, one text
each, temperature 1), and with the same --seed it asks question i with the project's one seeding
rule (`ladi_core.seeding.question_seed`), so on the same backend it reproduces training.eval's
texts, and its figures, exactly.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from openai import AsyncOpenAI
from tqdm import tqdm

from clients.report import emit_json
from ladi_core.metrics import pass_at_k
from ladi_core.seeding import question_seed
from ladi_core.tasks import get_task


async def run(a) -> dict:
    ks = sorted({int(k) for k in a.k.split(",")})
    n = max(ks)
    task = get_task(a.task, a.verifier)
    questions = task.questions("test", a.problems, seed=0)
    client = AsyncOpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=3, timeout=600)
    model = a.model or (await client.models.list()).data[0].id
    sem = asyncio.Semaphore(a.concurrency)
    bar = tqdm(total=len(questions), desc="eval")

    async def one(i, q):
        async with sem:
            r = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q.prompt}], n=n, temperature=a.temperature,
                max_tokens=a.max_tokens, seed=question_seed(a.seed, i),
                extra_body={"mode": "pass_at_k", "reference": q.reference, "verifier": task.verifier.name})
            bar.update(1)
            extra = r.model_extra or {}
            return extra["pass_at_k"]["correct"], [c.message.content for c in r.choices]

    t0 = time.time()
    try:
        results = await asyncio.gather(*(one(i, q) for i, q in enumerate(questions)))
    finally:
        bar.close()
        await client.close()  # inside the loop: closing after asyncio.run() ends raises noise
    summary = {"base_url": a.base_url, "model": model, "task": a.task, "questions": len(questions),
               "samples": n, "wall_s": round(time.time() - t0, 1)}
    for k in ks:
        summary[f"pass@{k}"] = statistics.fmean(pass_at_k(len(texts), c, k) for c, texts in results)
    if getattr(a, "per_question", False):
        summary["correct_per_question"] = [c for c, _ in results]
        summary["texts_per_question"] = [texts for _, texts in results]
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m clients.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--model")
    p.add_argument("--task", default="countdown")
    p.add_argument("--verifier")
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--k", default="1,8")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--per-question", action="store_true", help="also list each question's correct count and texts")
    p.add_argument("--out", help="write the summary JSON here")
    a = p.parse_args(argv)
    summary = asyncio.run(run(a))
    return emit_json(summary, a.out)


if __name__ == "__main__":
    main()
