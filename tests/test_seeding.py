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


def test_an_rl_rollout_follows_the_same_rule(latent_reasoner, token_reasoner, dlr_ckpt):
    """RL asks a step's questions together with the step's seed: its texts (and, for a policy whose
    plans are its noise, its plans) are what `Reasoner.generate` gives for that seed."""
    from ladi_core.generation import Reasoner
    from training.rewards import default_rewards
    from training.rl import ALGORITHMS  # noqa: F401  (training.rollout needs the algorithms loaded first)
    from training.rollout import latent_rollout, token_rollout

    task = get_task("countdown")
    qs = task.questions("train", 2, seed=0)
    seeds = [question_seed(SEED, i) for i in range(len(qs))]
    params = SamplingParams(1.0, 1.0, TOKENS)
    rewards = default_rewards(0.0)

    def texts(generations):
        return [[c.text for c in g.completions] for g in generations]

    # token level (GRPO): question i's G texts are generate's with the batch seed
    ro = token_rollout(token_reasoner, qs, task.verifier, group=4, params=params, seeds=seeds, rewards=rewards)
    want = token_reasoner.generate([q.prompt for q in qs], 1, 4, SamplingParams(1.0, 1.0, TOKENS, seed=SEED))
    assert [[d.text for d in row] for row in ro.scored.decoded] == texts(want)
    assert len({t for row in texts(want) for t in row}) > 1

    # an assistant policy's plans are its seeded noise: the rollout's plans and texts are generate's
    dlr = Reasoner.from_checkpoint(dlr_ckpt)
    ro = latent_rollout(dlr, qs, task.verifier, plans=PLANS, samples_per_plan=2, params=params, seeds=seeds,
                        generator=torch.Generator().manual_seed(0), rewards=rewards)
    want = dlr.generate([q.prompt for q in qs], PLANS, 2, SamplingParams(1.0, 1.0, TOKENS, seed=SEED))
    assert torch.allclose(ro.plans.latents, torch.cat([g.plans for g in want]), atol=1e-5)
    assert [[d.text for row in ro.scored.decoded[i * PLANS:(i + 1) * PLANS] for d in row] for i in range(2)] == \
        texts(want)

    # a diffusion policy's SDE adds the rollout's own noise: the plans start from the seeded noises,
    # and each plan's texts are those its question's seed gives it, decoded alone
    policy = latent_reasoner.checkpoint.policy
    ro = latent_rollout(latent_reasoner, qs, task.verifier, plans=PLANS, samples_per_plan=2, params=params,
                        seeds=seeds, generator=torch.Generator().manual_seed(0), rewards=rewards)
    assert torch.equal(ro.plans.trajectory[0], latent_reasoner.plan_noise(seeds, [PLANS] * 2)
                       * policy.sampler.init_noise_scale)
    embeds = latent_reasoner.prompt_embeds(latent_reasoner.prompt_ids([q.prompt for q in qs]))
    for i, s in enumerate(seeds):
        for m in range(PLANS):
            alone = latent_reasoner.decode([embeds[i]], ro.plans.latents[i * PLANS + m][None], 2,
                                           SamplingParams(1.0, 1.0, TOKENS, seed=s + m * 2))[0]
            assert [d.text for d in ro.scored.decoded[i * PLANS + m]] == [d.text for d in alone]
