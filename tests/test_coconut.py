"""Latent-space thinking (Coconut): the recurrent policy's thoughts, the curriculum, GRPO after
detached thoughts, latent RL's value-head objective, and serving a recurrent checkpoint."""
from __future__ import annotations

import json

import httpx
import pytest
import torch
from openai import OpenAI

from ladi_core.backends import SamplingParams
from ladi_core.checkpoint import load_checkpoint, read_config
from ladi_core.codec import build_inputs_embeds
from ladi_core.generation import Reasoner, pad_embeds
from ladi_core.policies import OnePlanError
from ladi_core.tasks import get_task
from training import rl
from training.algos import CoconutGRPO, LatentRL
from training.algos.grpo import token_log_probs
from training.coconut_sft import stage_example
from training.rewards import default_rewards
from training.rl_config import PRESETS, build_config
from training.rollout import completion_ids

from .references import countdown_reference_solved_by

Q = "Use 3 4 5 2 to make 23."
REF = {"numbers": [2, 3, 4, 5], "target": 23}
PROMPTS = [Q, "Make 10 from 1 2 3 4."]  # different lengths: the batch is padded


@pytest.fixture(scope="module")
def recurrent(recurrent_ckpt):
    return Reasoner.from_checkpoint(recurrent_ckpt)


def test_stage_examples_on_a_hand_made_chain_of_thought():
    cot = "9-4=5\n5*8=40\nanswer: (9-4)*8"
    assert stage_example(cot, 0, 2) == (0, cot)
    assert stage_example(cot, 1, 1) == (1, "5*8=40\nanswer: (9-4)*8")
    assert stage_example(cot, 1, 2) == (2, "5*8=40\nanswer: (9-4)*8")
    assert stage_example(cot, 2, 2) == (4, "answer: (9-4)*8")
    # a chain shorter than the stage: all its lines go, and the stage's thought count stays
    assert stage_example(cot, 3, 1) == (3, "answer: (9-4)*8")
    assert stage_example("answer: 3*4", 2, 1) == (2, "answer: 3*4")


@pytest.mark.slow
def test_thoughts_equal_a_hand_unrolled_loop_without_the_cache(recurrent):
    """KV-cached, left-padded batch thinking == per question, every pass recomputed from scratch."""
    ck = recurrent.checkpoint
    policy, decoder, bot = ck.policy, ck.policy.decoder, ck.codec.adapter.bot
    embeds = recurrent.prompt_embeds(recurrent.prompt_ids(PROMPTS))
    cond, mask = pad_embeds(embeds)
    with torch.no_grad():
        got = policy.think(cond, mask)
        n = policy.cfg.latent_tokens
        assert got.shape == (2, n, decoder.config.hidden_size) and n >= 2
        for q, e in enumerate(embeds):
            seq = torch.cat([e, bot[None]])
            for i in range(n):
                h = decoder.base_model(inputs_embeds=seq[None]).last_hidden_state[0, -1]
                assert torch.allclose(got[q, i], h, atol=1e-5), (q, i, (got[q, i] - h).abs().max())
                seq = torch.cat([seq, h[None]])
    # the sample is the thoughts, one plan per question; more plans would all be the same one
    sample = recurrent.sample_plans(embeds, 1)
    assert torch.allclose(sample.latents, got, atol=1e-6)
    with pytest.raises(OnePlanError, match="one plan"):
        recurrent.sample_plans(embeds, 2)
    with pytest.raises(ValueError, match="takes no steps"):
        recurrent.sample_plans(embeds, 1, steps=4)


@pytest.mark.slow
def test_greedy_answers_match_between_transformers_and_vllm(recurrent, recurrent_ckpt):
    from .conftest import _vllm_reasoner

    params = SamplingParams(temperature=0.0, max_tokens=48, seed=0)
    want = [g.completions[0].text for g in recurrent.generate(PROMPTS, 1, 1, params)]
    v = _vllm_reasoner(recurrent_ckpt)
    try:
        assert v.checkpoint.policy.decoder is not None  # a torch copy thinks; the engine decodes
        got = [g.completions[0].text for g in v.generate(PROMPTS, 1, 1, params)]
    finally:
        v.backend.close()
    assert got == want and all(want)


def _algo(cls, reasoner, **kw):
    cfg = build_config(cls.name, PRESETS["smoke"], kw)
    decoder = reasoner.backend.trainable_decoder()
    return cfg, decoder, cls(cfg, reasoner, decoder, get_task("countdown").verifier, default_rewards(0.1))


def _rollout(algo, reasoner, n=3):
    qs = get_task("countdown").questions("train", n, seed=1)
    return algo.rollout(reasoner, qs, list(range(n)), torch.Generator().manual_seed(0),
                        SamplingParams(1.0, 1.0, 24))


@pytest.mark.slow
def test_coconut_grpo_scores_only_the_language_after_the_latent_block(recurrent_ckpt):
    reasoner = Reasoner.from_checkpoint(recurrent_ckpt)
    cfg, decoder, algo = _algo(CoconutGRPO, reasoner)
    ro = _rollout(algo, reasoner)
    assert ro.thoughts is not None and not ro.thoughts.requires_grad  # detached constants
    g = cfg.plans * cfg.samples_per_plan
    prefixes = reasoner.prefixes(build_inputs_embeds(decoder.get_input_embeddings(), ro.prompt_ids), ro.thoughts)
    plan_len = reasoner.plan_positions
    assert all(p.shape[0] == len(ids) + plan_len for p, ids in zip(prefixes, ro.prompt_ids))
    rows = [p for p in prefixes for _ in range(g)]
    comps = [completion_ids(d, reasoner.tokenizer.eos_token_id) for row in ro.scored.decoded for d in row]
    with torch.no_grad():
        logp, mask = token_log_probs(decoder, rows, comps)
    assert mask.sum(-1).tolist() == [len(c) for c in comps]  # one log-prob per language token, none before
    # each one independently: the full sequence's logits, read from the last prefix position on
    r = max(range(len(comps)), key=lambda i: len(comps[i]))
    ids = torch.tensor(comps[r])
    x = torch.cat([rows[r], decoder.get_input_embeddings()(ids)])[None]
    with torch.no_grad():
        logits = decoder(inputs_embeds=x).logits[0, rows[r].shape[0] - 1:-1].log_softmax(-1)
    assert torch.allclose(logp[r, :len(ids)], logits.gather(-1, ids[:, None])[:, 0], atol=1e-5)
    loss, stats = algo.loss(ro, {})
    loss.backward()
    assert reasoner.checkpoint.codec.adapter.bot.grad is None  # the frame does not train
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())


@pytest.mark.slow
def test_a_latent_rl_step_raises_the_value_heads_score_of_the_thoughts(recurrent_ckpt):
    reasoner = Reasoner.from_checkpoint(recurrent_ckpt)
    cfg, decoder, algo = _algo(LatentRL, reasoner, value_lr=0.0, lr=1e-3)
    policy = reasoner.checkpoint.policy
    ro = _rollout(algo, reasoner)
    cond, mask = pad_embeds(ro.prompt_embeds)

    def score():
        with torch.no_grad():
            return torch.sigmoid(policy.value(policy.think(cond, mask))).mean().item()

    before, head = score(), {k: v.clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.AdamW(algo.param_groups(), weight_decay=0.0)
    loss, stats = algo.loss(ro, {})
    assert 0 <= stats["value_target"] <= 1 and stats["value_bce"] > 0
    opt.zero_grad()
    loss.backward()
    assert policy.value_head.weight.grad.abs().sum() > 0  # the BCE trains the head (at lr 0 here)
    opt.step()
    assert all(torch.equal(head[k], v) for k, v in policy.state_dict().items())  # lr 0: the head held still
    assert score() > before  # the decoder moved its thoughts up the critic's score


@pytest.mark.slow
def test_latent_rls_value_warmup_trains_only_the_head_then_hands_over(recurrent_ckpt):
    reasoner = Reasoner.from_checkpoint(recurrent_ckpt)
    cfg, decoder, algo = _algo(LatentRL, reasoner, value_warmup=1)
    head = reasoner.checkpoint.policy.value_head
    ro = _rollout(algo, reasoner)
    grads = {}
    for step in (0, 1):
        algo.begin_step(step)
        decoder.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        loss, stats = algo.loss(ro, {})
        loss.backward()
        assert head.weight.grad.abs().sum() > 0  # the critic learns in both phases
        grads[step] = [p.grad for p in decoder.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert grads[0] == []  # warming up: nothing reaches the decoder
    assert grads[1]  # then the policy term trains it
    # the warm-up loss is the BCE alone
    algo.begin_step(0)
    loss, stats = algo.loss(ro, {})
    assert loss.item() == pytest.approx(stats["value_bce"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["coconut-grpo", "latent-rl"])
def test_smoke_runs_train_the_decoder(algo, recurrent_ckpt, tmp_path):
    out = tmp_path / algo
    final = rl.main(["--algo", algo, "--init", str(recurrent_ckpt), "--out", str(out), "--preset", "smoke",
                     "--lr", "1e-3", "--format-weight", "0.1", "--steps", "2", "--eval-questions", "2"])
    assert final["questions"] == 2 and final["samples"] == 2  # one plan, max(k) = 2 texts of it
    cfg = read_config(out)
    assert cfg.policy_kind == "recurrent" and cfg.provenance.metrics["algo"] == algo
    lines = [json.loads(x) for x in (out.with_name(out.name + ".work") / "metrics.jsonl").read_text().splitlines()
             if '"step"' in x and '"stage"' not in x]
    assert [x["step"] for x in lines] == [0, 1] and all(x["texts"] == 4 * 8 for x in lines)
    if algo == "latent-rl":
        assert all(0 < x["value_score"] < 1 and x["value_bce"] > 0 for x in lines)
    else:
        assert lines[0]["clip_frac"] == 0.0
    before, after = load_checkpoint(recurrent_ckpt), load_checkpoint(out)
    dec_before = Reasoner.from_checkpoint(recurrent_ckpt).backend.trainable_decoder().state_dict()
    dec_after = Reasoner.from_checkpoint(out).backend.trainable_decoder().state_dict()
    assert any(not torch.equal(dec_before[k], dec_after[k]) for k in dec_before)  # the decoder trained
    moved = any(not torch.equal(v, after.policy.state_dict()[k]) for k, v in before.policy.state_dict().items())
    assert moved == (algo == "latent-rl")  # only latent RL trains its value head
    assert torch.equal(before.codec.adapter.bot, after.codec.adapter.bot)


@pytest.mark.slow
def test_rl_refuses_a_policy_of_another_kind(recurrent_ckpt, latent_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="recurrent policy"):
        rl.main(["--algo", "latent-rl", "--init", str(latent_ckpt), "--out", str(tmp_path / "a"), "--preset", "smoke"])
    with pytest.raises(SystemExit, match="diffusion policy"):
        rl.main(["--algo", "ladi", "--init", str(recurrent_ckpt), "--out", str(tmp_path / "b"), "--preset", "smoke"])


# --- serving ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["transformers", "vllm"])
def recurrent_server(request, recurrent_ckpt):
    from .conftest import serving

    with serving(recurrent_ckpt, request.param) as s:
        yield s


@pytest.mark.slow
def test_the_server_serves_a_recurrent_checkpoint(recurrent_server):
    live, reasoner = recurrent_server
    client = OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0]
    assert model.model_extra["ladi"]["policy"] == "recurrent"

    def ask(**kw):
        kw.setdefault("max_tokens", 32)
        return client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": Q}], **kw)

    # sample: n texts of the question's one plan; the same seed, the same texts as Reasoner.generate
    r = ask(n=3, seed=3, temperature=1.0)
    want = reasoner.generate([Q], plans=1, samples_per_plan=3,
                             params=SamplingParams(temperature=1.0, max_tokens=32, seed=3))[0]
    assert [c.message.content for c in r.choices] == [c.text for c in want.completions]
    assert {c.plan_index for c in r.choices} == {0}
    verifier = get_task("countdown").verifier
    b = ask(n=2, seed=5, extra_body={"mode": "best_of_n", "best_of": 4, "reference": REF})
    assert len(b.choices) == 2
    for c in b.choices:
        assert c.verified == (verifier.score(c.message.content, REF).correct >= 1.0)
    texts = [c.message.content for c in ask(n=8, seed=9, max_tokens=64).choices]
    ref = countdown_reference_solved_by(texts)  # at least one candidate is correct by construction
    k = ask(n=8, seed=9, max_tokens=64, extra_body={"mode": "pass_at_k", "reference": ref})
    pak = k.model_extra["pass_at_k"]
    assert [c.message.content for c in k.choices] == texts
    truth = [verifier.score(c.message.content, ref).correct >= 1.0 for c in k.choices]
    assert pak["samples"] == 8 and pak["correct"] == sum(truth) == sum(c.verified for c in k.choices) > 0
    for body, param in (({"latent_plans": 2}, "latent_plans"), ({"denoising_steps": 4}, "denoising_steps")):
        bad = httpx.post(live.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": Q}], "max_tokens": 8, **body})
        assert bad.status_code == 400, bad.text
        err = bad.json()["error"]
        assert err["param"] == param and "recurrent policy" in err["message"]
