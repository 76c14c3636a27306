"""The one seeding rule (ladi_core/seeding.py): a seed gives the same plans and texts through
`Reasoner.generate`, `training.eval` and the HTTP API, whatever else shares the batch."""
from __future__ import annotations

import httpx
import pytest
import torch

from ladi_core.backends import SamplingParams
from ladi_core.decoder import chat_prompt
from ladi_core.seeding import question_seed
from ladi_core.tasks import get_task
from server.app import create_app
from server.config import ServerConfig
from training.eval import evaluate

from .live import LiveServer

pytestmark = pytest.mark.slow
SEED, PLANS, TOKENS = 77, 3, 32


def test_one_seed_gives_the_same_plans_and_texts_everywhere(latent_reasoner):
    task = get_task("countdown")
    qs = task.questions("test", 3, seed=0)
    params = SamplingParams(1.0, 1.0, TOKENS, seed=SEED)
    together = latent_reasoner.generate([q.prompt for q in qs], PLANS, 1, params)
    alone = [latent_reasoner.generate([q.prompt], PLANS, 1, SamplingParams(1.0, 1.0, TOKENS,
                                                                           seed=question_seed(SEED, i)))[0]
             for i, q in enumerate(qs)]
    texts = [[c.text for c in g.completions] for g in together]
    assert texts == [[c.text for c in g.completions] for g in alone]  # company changes nothing
    for g, a in zip(together, alone):
        assert torch.allclose(g.plans, a.plans, atol=1e-5)  # padding to the batch's longest question: float noise only
    assert len({t for row in texts for t in row}) > 1  # not trivially equal

    # training.eval, in chunks of 2 questions: the same texts (its answers and first example)
    recs = evaluate(latent_reasoner, qs, task.verifier, plans=PLANS, samples_per_plan=1, params=params,
                    batch_questions=2, progress=False)
    for r, q, row in zip(recs, qs, texts):
        assert r["example"] == row[0]
        assert r["answers"] == [task.verifier.score(t, q.reference).answer for t in row]

    # the HTTP API: one chat request per question with its question seed, and one completions
    # request for all three prompts with the batch's seed
    cfg = ServerConfig(checkpoint=str(latent_reasoner.checkpoint.path))
    with LiveServer(create_app(cfg, latent_reasoner)) as live:
        for i, q in enumerate(qs):
            r = httpx.post(live.url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": q.prompt}], "n": PLANS, "latent_plans": PLANS,
                "max_tokens": TOKENS, "seed": question_seed(SEED, i)}).json()
            assert [c["message"]["content"] for c in r["choices"]] == texts[i]
            assert [c["plan_index"] for c in r["choices"]] == list(range(PLANS))
        tok = latent_reasoner.tokenizer
        r = httpx.post(live.url + "/v1/completions", timeout=60, json={
            "prompt": [chat_prompt(tok, q.prompt) for q in qs], "n": PLANS, "latent_plans": PLANS,
            "max_tokens": TOKENS, "seed": SEED}).json()
        assert [c["text"] for c in r["choices"]] == [t for row in texts for t in row]
