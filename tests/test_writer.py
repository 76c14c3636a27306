"""The writer stage: the decoder learns to read the question beside the plan; nothing else moves."""
import json

import pytest
import torch
from safetensors.torch import load_file

from ladi_core.checkpoint import load_checkpoint
from ladi_core.generation import Reasoner
from ladi_core.tasks import get_task
from training import eval as ev
from training import writer


@pytest.fixture(scope="module")
def written(latent_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("writer") / "ckpt"
    writer.main(["--init", str(latent_ckpt), "--out", str(out), "--preset", "smoke", "--seed", "0"])
    return out


def test_the_writer_reads_the_question_and_keeps_the_plan_space(latent_ckpt, written):
    before, after = load_checkpoint(latent_ckpt), load_checkpoint(written)
    assert not before.codec.cfg.decoder_sees_question and after.codec.cfg.decoder_sees_question
    enc_before, enc_after = load_file(latent_ckpt / "codec.safetensors"), load_file(written / "codec.safetensors")
    for k, v in enc_before.items():  # the encoder and the latent statistics are the init's, bit for bit
        if not k.startswith("adapter."):
            assert torch.equal(v, enc_after[k]), k
    assert any(not torch.equal(enc_before[k], enc_after[k]) for k in enc_before if k.startswith("adapter."))
    pol_before, pol_after = load_file(latent_ckpt / "policy.safetensors"), load_file(written / "policy.safetensors")
    assert all(torch.equal(pol_before[k], pol_after[k]) for k in pol_before)  # the prior is untouched
    dec_before = load_file(latent_ckpt / "decoder" / "model.safetensors")
    dec_after = load_file(written / "decoder" / "model.safetensors")
    assert any(not torch.equal(dec_before[k], dec_after[k]) for k in dec_before)
    prov = json.loads((written / "ladi.json").read_text())["provenance"]
    assert prov["command"].startswith("python -m training.writer --init")
    assert prov["metrics"]["init"] == str(latent_ckpt) and "heldout_pass@1" in prov["metrics"]


def test_the_written_prefix_carries_the_prompt_and_the_plan_is_still_read(written):
    r = Reasoner.from_checkpoint(written)
    ids = r.prompt_ids(["Make 24 from 8 5 8 3."])
    embeds = r.prompt_embeds(ids)
    plans = torch.zeros(1, r.checkpoint.codec.cfg.latent_tokens, r.checkpoint.codec.cfg.latent_dim)
    assert r.prefixes(embeds, plans)[0].shape[0] == len(ids[0]) + r.plan_positions
    qs = get_task("countdown").questions("test", 32, seed=0)
    info = ev.latent_information(r, qs)
    assert info["ce_own_z"] < 0.9 * info["ce_shuffled_z"], info  # its own plan still tells it the reasoning


def test_the_writer_refuses_what_it_cannot_rewrite(written, token_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="token-level"):
        writer.main(["--init", str(token_ckpt), "--out", str(tmp_path / "a"), "--preset", "smoke"])
    with pytest.raises(SystemExit, match="already sees the question"):
        writer.main(["--init", str(written), "--out", str(tmp_path / "b"), "--preset", "smoke"])
