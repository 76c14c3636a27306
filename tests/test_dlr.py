"""DLR: the assistant policy's density, its contrastive term, its warm-up and RL on a frozen decoder,
and serving an assistant checkpoint through the OpenAI SDK."""
from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from openai import OpenAI
from safetensors.torch import load_file

from ladi_core.backends import SamplingParams
from ladi_core.checkpoint import load_checkpoint, read_config
from ladi_core.policies import AssistantPolicy, AssistantPolicyConfig, info_nce
from ladi_core.tasks import get_task
from training import rl
from training.algos.dlr import contrastive_term, dlr_loss, gaussian_kl

from .references import countdown_reference_solved_by

Q = "Use 3 4 5 2 to make 23."
REF = {"numbers": [2, 3, 4, 5], "target": 23}


def tiny_assistant(slots=3) -> AssistantPolicy:
    torch.manual_seed(0)
    return AssistantPolicy(AssistantPolicyConfig(latent_tokens=2, latent_dim=3, hidden_size=8, d_model=16,
                                                 layers=1, encoder_layers=1, heads=2, slots=slots))


def cond(q=2, t=5):
    g = torch.Generator().manual_seed(4)
    c, m = torch.randn(q, t, 8, generator=g), torch.ones(q, t, dtype=torch.bool)
    if q > 1:
        m[1, 3:] = False  # the second question is shorter: padding
    return c, m


def test_the_plan_log_probability_is_the_gaussian_density():
    p = tiny_assistant()
    with torch.no_grad():
        p.log_std.copy_(torch.tensor([-1.0, 0.0, 0.5]))
    c, m = cond()
    s = p.sample(c, m, 3, generator=torch.Generator().manual_seed(1), sde=True, temperature=0.7)
    mean = s.trajectory[0].double()
    std = torch.tensor([-1.0, 0.0, 0.5]).double().exp() * 0.7
    # the density written out by hand: prod over coordinates of exp(-(z-mu)^2 / 2s^2) / (s sqrt(2 pi))
    z = s.latents.double()
    by_hand = (-((z - mean) ** 2) / (2 * std**2) - torch.log(std * math.sqrt(2 * math.pi))).flatten(1).sum(-1)
    torch.testing.assert_close(s.log_probs[:, 0].double(), by_hand, rtol=1e-5, atol=1e-5)
    lp = p.rescore(s, c, m).log_probs[:, 0]  # re-scoring the stored plans under the same weights gives the same
    torch.testing.assert_close(lp, s.log_probs[:, 0], rtol=1e-6, atol=1e-5)


def test_slots_give_distinct_means_and_the_seed_fixes_the_draw():
    p = tiny_assistant(slots=3)
    c, m = cond()
    a = p.sample(c, m, 4, generator=torch.Generator().manual_seed(1), sde=True)
    b = p.sample(c, m, 4, generator=torch.Generator().manual_seed(1), sde=True)
    assert torch.equal(a.latents, b.latents)
    means = a.trajectory[0]
    assert not torch.allclose(means[0], means[1])  # slots 0 and 1 differ
    torch.testing.assert_close(means[3], means[0])  # plan 3 reuses slot 0 (4 plans, 3 slots)
    flat = p.sample(c, m, 2, temperature=0.0).latents  # temperature 0: the slot means themselves
    torch.testing.assert_close(flat, p.means(c, m, [2, 2]))
    with pytest.raises(ValueError, match=r"takes no steps \(its settings: temperature\)"):
        p.sample(c, m, 2, steps=4)
    p.sample(c, m, 2, steps=None, guidance=None)  # unset settings (training.eval's defaults) are no request


def test_info_nce_on_hand_made_vectors():
    e = torch.eye(3)[None]  # 3 orthogonal plans, each its own teacher
    tau = 0.5
    # logits: 1/tau on the diagonal, 0 elsewhere -> loss = log(e^(1/tau) + 2) - 1/tau
    assert info_nce(e, e, tau).item() == pytest.approx(math.log(math.exp(1 / tau) + 2) - 1 / tau, rel=1e-5)
    assert info_nce(e, e, 0.05).item() < 1e-6  # SoftCoT++'s tau: orthogonal plans cost nothing
    same = torch.ones(1, 3, 4)  # plans that cannot be told apart: chance, log K
    assert info_nce(same, same, 0.05).item() == pytest.approx(math.log(3), rel=1e-6)
    # two plans, teacher views rotated: plan 0's teacher is closer to plan 1
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert info_nce(s, t, 1.0).item() == pytest.approx(math.log(1 + math.e), rel=1e-6)
    with pytest.raises(ValueError):
        info_nce(torch.ones(3, 4), torch.ones(3, 4))


def test_the_contrastive_term_pushes_a_questions_slots_apart():
    p = tiny_assistant(slots=3)
    c, m = cond(q=1)
    opt = torch.optim.SGD(p.parameters(), lr=0.05)
    before = torch.pdist(p.means(c, m, [3]).detach().flatten(1)).min()
    for _ in range(20):
        loss = contrastive_term(p.means(c, m, [3]), 3, 3, dropout=0.0, tau=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = torch.pdist(p.means(c, m, [3]).detach().flatten(1)).min()
    assert after > before


def test_gaussian_kl_is_zero_at_the_reference_and_matches_torch():
    mean, ref = torch.randn(2, 2, 3), torch.randn(2, 2, 3)
    ls, rls = torch.tensor([-1.0, 0.0, 0.3]), torch.tensor([0.2, -0.5, 0.0])
    assert torch.allclose(gaussian_kl(mean, mean, ls, ls), torch.zeros(2))
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mean, ls.exp()),
                                             torch.distributions.Normal(ref, rls.exp())).flatten(1).sum(-1)
    torch.testing.assert_close(gaussian_kl(mean, ref, ls, rls), want)


def test_a_dlr_step_raises_the_log_probability_of_the_rewarded_plan():
    p = tiny_assistant(slots=4)
    c, m = cond(q=1)
    with torch.no_grad():
        plans = p.sample(c, m, 4, generator=torch.Generator().manual_seed(2), sde=True)
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5])
    opt = torch.optim.SGD(p.parameters(), lr=1e-3)
    logp = p.rescore(plans, c, m).log_probs[:, 0]
    loss, stats = dlr_loss(logp, plans.log_probs[:, 0], adv, clip=0.2)
    assert stats["clip_frac"] == 0.0
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = p.rescore(plans, c, m).log_probs[:, 0]
    gain = after - plans.log_probs[:, 0]
    assert gain[0] > 0 and gain[0] > gain[1:].max()


# --- the warm-up and RL stages on the smoke checkpoint ------------------------------------------------

def _files(ckpt, pattern):
    return {f.name: load_file(f) for f in sorted((ckpt / "decoder").glob(pattern))}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])


@pytest.mark.slow
def test_the_warm_up_trains_an_assistant_over_a_frozen_decoder(dlr_ckpt, latent_ckpt):
    cfg = read_config(dlr_ckpt)
    assert cfg.kind == "latent" and cfg.policy_kind == "assistant"
    assert "training.assistant_sft" in cfg.provenance.command and "heldout_pass@1" in cfg.provenance.metrics
    assert _same(_files(dlr_ckpt, "*.safetensors"), _files(latent_ckpt, "*.safetensors"))
    assert _same({"c": load_file(dlr_ckpt / "codec.safetensors")}, {"c": load_file(latent_ckpt / "codec.safetensors")})
    ck = load_checkpoint(dlr_ckpt)
    assert isinstance(ck.policy, AssistantPolicy)
    lines = [json.loads(x) for x in (dlr_ckpt.with_name(dlr_ckpt.name + ".work") / "metrics.jsonl").read_text()
             .splitlines() if '"ce"' in x]
    assert len(lines) >= 2 and all(math.isfinite(x["ce"]) and x["posterior"] >= 0 for x in lines)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_dlr_smoke_run_leaves_the_decoder_bit_identical(backend, dlr_ckpt, tmp_path):
    out = tmp_path / f"dlr-{backend}"
    extra = ["--rollout-backend", "vllm", "--vllm-cpu-kvcache-space-gib", "1"] if backend == "vllm" else []
    final = rl.main(["--algo", "dlr", "--init", str(dlr_ckpt), "--out", str(out), "--preset", "smoke", "--lr", "1e-3",
                     "--format-weight", "0.5", "--steps", "2", "--eval-questions", "2", *extra])
    assert final["questions"] == 2
    cfg = read_config(out)
    assert cfg.policy_kind == "assistant" and cfg.provenance.metrics["algo"] == "dlr"
    lines = [json.loads(x) for x in (out.with_name(out.name + ".work") / "metrics.jsonl").read_text().splitlines()
             if '"step"' in x and '"stage"' not in x]
    assert [x["step"] for x in lines] == [0, 1] and lines[0]["clip_frac"] == 0.0
    assert all(x["info_nce"] >= 0 and x["reward_format"] >= 0 for x in lines)
    assert _same(_files(out, "*.safetensors"), _files(dlr_ckpt, "*.safetensors"))  # the decoder: bit for bit
    before, after = load_checkpoint(dlr_ckpt).policy.state_dict(), load_checkpoint(out).policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the assistant moved


@pytest.mark.slow
def test_dlr_needs_an_assistant_checkpoint(latent_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="assistant policy"):
        rl.main(["--algo", "dlr", "--init", str(latent_ckpt), "--out", str(tmp_path / "x"), "--preset", "smoke"])


# --- serving ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["transformers", "vllm"])
def dlr_server(request, dlr_ckpt):
    from .conftest import serving

    with serving(dlr_ckpt, request.param) as s:
        yield s


@pytest.mark.slow
def test_the_server_serves_an_assistant_checkpoint(dlr_server):
    live, reasoner = dlr_server
    client = OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0]
    assert model.model_extra["ladi"]["policy"] == "assistant"

    def ask(**kw):
        kw.setdefault("max_tokens", 32)
        return client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": Q}], **kw)

    # sample: n choices over n plans; the same seed, the same texts as Reasoner.generate
    r = ask(n=2, seed=3, temperature=0.0, extra_body={"latent_plans": 2})
    want = reasoner.generate([Q], plans=2, samples_per_plan=1,
                             params=SamplingParams(temperature=0.0, max_tokens=32, seed=3))[0]
    assert [c.message.content for c in r.choices] == [c.text for c in want.completions]
    assert sorted(c.plan_index for c in r.choices) == [0, 1]
    verifier = get_task("countdown").verifier
    b = ask(n=2, seed=5, extra_body={"mode": "best_of_n", "best_of": 4, "reference": REF})
    assert len(b.choices) == 2
    for c in b.choices:  # each verdict re-checked independently
        assert c.verified == (verifier.score(c.message.content, REF).correct >= 1.0)
    texts = [c.message.content for c in ask(n=8, seed=9, max_tokens=64).choices]
    ref = countdown_reference_solved_by(texts)  # at least one candidate is correct by construction
    k = ask(n=8, seed=9, max_tokens=64, extra_body={"mode": "pass_at_k", "reference": ref})
    pak = k.model_extra["pass_at_k"]
    assert [c.message.content for c in k.choices] == texts
    assert sorted(c.plan_index for c in k.choices) == list(range(8))
    truth = [verifier.score(c.message.content, ref).correct >= 1.0 for c in k.choices]
    assert pak["samples"] == 8 and pak["correct"] == sum(truth) == sum(c.verified for c in k.choices) > 0
    for knob, value in (("denoising_steps", 4), ("guidance_scale", 2.0), ("diversity", 0.5), ("repulsion", "rbf")):
        bad = httpx.post(live.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": Q}], "max_tokens": 8, knob: value})
        assert bad.status_code == 400, bad.text
        err = bad.json()["error"]
        assert err["param"] == knob and "assistant policy" in err["message"]


@pytest.mark.slow
def test_without_plans_decodes_the_prompt_alone(latent_reasoner):
    """The forgetting check's view of a latent checkpoint: its decoder with no plan in the prefix."""
    bare = latent_reasoner.without_plans()
    assert not bare.is_latent and latent_reasoner.is_latent and bare.backend is latent_reasoner.backend
    params = SamplingParams(temperature=0.0, max_tokens=24, seed=0)
    got = bare.generate([Q], plans=1, samples_per_plan=1, params=params)[0].completions[0]
    embeds = latent_reasoner.prompt_embeds(latent_reasoner.prompt_ids([Q]))
    want = latent_reasoner.decode(embeds, None, 1, params)[0][0]
    assert got.plan_index is None and got.text == want.text
