"""The supervised pipeline end to end (smoke preset), its provenance, and --resume."""
import json

import pytest
import torch

from ladi_core.checkpoint import read_config
from training import sft
from training.common import MetricsLog
from training.config import SFTConfig, StageConfig


@pytest.mark.slow
def test_smoke_pipeline_writes_both_checkpoints_with_provenance(latent_ckpt, token_ckpt):
    lat, tok = read_config(latent_ckpt), read_config(token_ckpt)
    assert (lat.kind, tok.kind) == ("latent", "token")
    for cfg in (lat, tok):
        p = cfg.provenance
        assert "training.sft" in p.command and "--preset smoke" in p.command
        assert p.seed == 0 and p.config["task"] == "countdown"
        assert "heldout_pass@1" in p.metrics and 0.0 <= p.metrics["heldout_pass@1"] <= 1.0
        assert p.commit is None or len(p.commit) >= 40
    assert lat.codec["latent_tokens"] == lat.policy["latent_tokens"]
    assert {"decoder_s", "codec_s", "prior_s"} <= set(lat.provenance.metrics)
    work = latent_ckpt.with_name(latent_ckpt.name + ".work")
    stages = {json.loads(line)["stage"] for line in (work / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"decoder", "codec", "prior", "done"}


@pytest.mark.slow
def test_rerun_needs_resume_and_resume_skips_finished_stages(latent_ckpt, capsys):
    args = ["--preset", "smoke", "--out", str(latent_ckpt), "--seed", "0"]
    with pytest.raises(SystemExit, match="--resume"):
        sft.main(args)
    with pytest.raises(SystemExit, match="configuration differs"):
        sft.main(["--preset", "smoke", "--out", str(latent_ckpt), "--seed", "1", "--resume"])


def _toy_stage(tmp_path, steps, crash_at=None):
    """A tiny regression trained by sft.run_stage, optionally interrupted at `crash_at`."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    cfg = SFTConfig(seed=3, save_every=5)

    def loss_fn(rng, gen, progress):
        if crash_at is not None and rng.random() >= 0 and loss_fn.step == crash_at:
            raise KeyboardInterrupt
        loss_fn.step += 1
        x = torch.randn(16, 4, generator=gen)
        return (model(x) - x.sum(-1, keepdim=True)).pow(2).mean(), {}

    loss_fn.step = 0
    sft.run_stage("toy", StageConfig(steps, 16, 0.05, warmup=2), {"m": model}, list(model.parameters()),
                  loss_fn, cfg, tmp_path, MetricsLog(tmp_path / "log.jsonl"))
    return model


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight = _toy_stage(tmp_path / "a", 20)
    with pytest.raises(KeyboardInterrupt):
        _toy_stage(tmp_path / "b", 20, crash_at=12)  # dies after the step-10 save
    resumed = _toy_stage(tmp_path / "b", 20)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_a_failed_run_exits_non_zero(tmp_path):
    """`python -m training.sft` on a dataset that does not exist: a clear message and a non-zero status."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "training.sft", "--task", str(tmp_path / "missing.jsonl"),
                        "--verifier", "math", "--preset", "smoke", "--out", str(tmp_path / "ckpt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "missing.jsonl" in r.stderr


def test_a_stage_whose_loss_is_not_finite_fails(tmp_path):
    """A NaN loss ends the stage with an error (the run then exits non-zero) instead of training on."""
    import torch

    from training.common import MetricsLog
    from training.config import PRESETS, StageConfig
    from training.stage import run_stage

    w = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(RuntimeError, match="loss is nan"):
        run_stage("demo", StageConfig(steps=5, batch_size=1, lr=1e-3, warmup=0), {"m": torch.nn.Linear(1, 1)}, [w],
                  lambda rng, gen, progress: ((w * float("nan")).sum(), {}), PRESETS["smoke"], tmp_path,
                  MetricsLog(tmp_path / "m.jsonl"))


@pytest.mark.slow
def test_resume_across_a_real_stage_boundary_reproduces_the_uninterrupted_run(latent_ckpt, tmp_path, monkeypatch):
    """The smoke run, killed in its codec stage (after the decoder stage finished and a codec save),
    then --resume: the checkpoint it ends with is the uninterrupted run's, tensor for tensor."""
    from safetensors.torch import load_file

    out = tmp_path / "ckpt"
    args = ["--task", "countdown", "--preset", "smoke", "--out", str(out), "--seed", "0"]
    real = sft.latent_reconstruction_loss
    calls = {"n": 0}

    def dies_in_the_codec_stage(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 50:  # smoke saves every 40 steps: this is after the step-40 save
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sft, "latent_reconstruction_loss", dies_in_the_codec_stage)
    with pytest.raises(KeyboardInterrupt):
        sft.main(args)
    work = out.with_name("ckpt.work")
    assert (work / "decoder.pt").is_file() and (work / "codec.pt").is_file() and not (work / "prior.pt").exists()
    monkeypatch.setattr(sft, "latent_reconstruction_loss", real)
    sft.main(args + ["--resume"])
    for rel in ("decoder/model.safetensors", "codec.safetensors", "policy.safetensors"):
        a, b = load_file(latent_ckpt / rel), load_file(out / rel)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (rel, k, (a[k] - b[k]).abs().max())
