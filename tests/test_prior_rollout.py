"""LaDiR's stage 2: the answer loss reaches the prior through its own sampled plans; nothing else moves."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from ladi_core.checkpoint import load_checkpoint
from ladi_core.decoder import load_decoder
from ladi_core.generation import pad_embeds
from ladi_core.tasks import get_task
from training import prior_rollout
from training.stage import Examples


@pytest.fixture(scope="module")
def rolled(latent_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("prior_rollout") / "ckpt"
    prior_rollout.main(["--init", str(latent_ckpt), "--out", str(out), "--preset", "smoke", "--seed", "0",
                        "--references", "2"])
    return out


def test_the_answer_loss_flows_through_every_denoising_step_into_the_prior(latent_ckpt):
    ck = load_checkpoint(latent_ckpt)
    decoder, tok = load_decoder(ck.decoder_dir)
    prompts, refs = Examples(get_task("countdown"), tok).batch_with_references(4, random.Random(0), 2)
    gen = torch.Generator().manual_seed(0)
    prompt_embeds = [decoder.get_input_embeddings()(torch.tensor(p)) for p in prompts]
    cond, cond_mask = pad_embeds(prompt_embeds)
    loss = prior_rollout.answer_loss_through_plans(decoder, ck.codec, ck.policy, prompt_embeds, cond, cond_mask,
                                                   refs, 3, gen)
    loss.backward()
    den = ck.policy.denoiser
    # the question encoder and the last block's output head both get a gradient: the loss went
    # through the plan, back through the ODE steps, into the velocity model and its condition
    assert den.out.weight.grad is not None and den.out.weight.grad.abs().sum() > 0
    assert den.encoder[0].qkv.weight.grad.abs().sum() > 0


def test_each_plan_is_scored_by_the_reference_it_explains_best(latent_ckpt):
    ck = load_checkpoint(latent_ckpt)
    decoder, tok = load_decoder(ck.decoder_dir)
    prompts, refs = Examples(get_task("countdown"), tok).batch_with_references(1, random.Random(1), 3)
    assert len({tuple(r) for r in refs[0]}) == 3  # countdown questions have >= 4 distinct solutions
    prompt_embeds = [decoder.get_input_embeddings()(torch.tensor(p)) for p in prompts]
    cond, cond_mask = pad_embeds(prompt_embeds)

    def loss(rs):  # the same noise, so the same plan, for every call
        with torch.no_grad():
            return prior_rollout.answer_loss_through_plans(decoder, ck.codec, ck.policy, prompt_embeds, cond,
                                                           cond_mask, [rs], 3, torch.Generator().manual_seed(0))

    each = [loss([r]).item() for r in refs[0]]
    assert len(set(each)) == 3
    assert loss(refs[0]).item() == pytest.approx(min(each), rel=1e-6)
    assert loss([refs[0][0], refs[0][0]]).item() == pytest.approx(each[0], rel=1e-6)
    with pytest.raises(ValueError, match="same number"):
        prior_rollout.answer_loss_through_plans(decoder, ck.codec, ck.policy, prompt_embeds * 2, *pad_embeds(
            prompt_embeds * 2), [refs[0], refs[0][:1]], 3, torch.Generator().manual_seed(0))


def test_the_stage_trains_the_prior_only_and_samples_as_it_trained(latent_ckpt, rolled):
    before, after = load_checkpoint(latent_ckpt), load_checkpoint(rolled)
    for name in ("codec.safetensors", "decoder/model.safetensors"):
        a, b = load_file(latent_ckpt / name), load_file(rolled / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name  # bit for bit
    pa, pb = load_file(latent_ckpt / "policy.safetensors"), load_file(rolled / "policy.safetensors")
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)
    assert after.policy.sampler.steps == prior_rollout.PRESETS["smoke"].denoising_steps != before.policy.sampler.steps
    prov = json.loads((rolled / "ladi.json").read_text())["provenance"]
    assert prov["command"].startswith("python -m training.prior_rollout --init")
    assert prov["metrics"]["init"] == str(latent_ckpt) and "heldout_pass@1" in prov["metrics"]
    log = [json.loads(line) for line in (rolled.with_name("ckpt.work") / "metrics.jsonl").read_text().splitlines()]
    assert any("ce" in r and "fm" in r for r in log)
    assert json.loads((rolled.with_name("ckpt.work") / "config.json").read_text())["references"] == 2


def test_the_stage_refuses_a_token_checkpoint(token_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="token-level"):
        prior_rollout.main(["--init", str(token_ckpt), "--out", str(tmp_path / "a"), "--preset", "smoke"])
