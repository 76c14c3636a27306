"""--fsdp under torchrun (2 processes, gloo, CPU): the sharded decoder ends where one process ends on
the same global batch, a stopped run resumes bit for bit, and what cannot be sharded is refused."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.servers import free_port

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def run(cmd: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "decoder" / "model.safetensors")


def test_fsdp_ends_with_the_weights_of_one_process_on_the_same_global_batch(token_ckpt, tmp_path):
    common = ["-m", "training.rl", "--algo", "grpo", "--init", str(token_ckpt), "--preset", "smoke", "--steps", "2",
              "--eval-questions", "2", "--threads", "1", "--lr", "1e-4", "--format-weight", "0.5"]
    r = run([*TORCHRUN, "--master_port", str(free_port()), *common, "--fsdp", "--out", str(tmp_path / "fsdp")])
    assert "decoder layers sharded over 2 ranks" in r.stdout and "ranks in sync" in r.stdout
    run([sys.executable, *common, "--out", str(tmp_path / "one")])
    init, one, fsdp = weights(token_ckpt), weights(tmp_path / "one"), weights(tmp_path / "fsdp")
    assert set(fsdp) == set(one)  # gathered and saved in the usual format
    assert any(not torch.equal(init[k], one[k]) for k in init)  # the run moved the weights
    for k in one:
        assert torch.allclose(fsdp[k], one[k], atol=1e-5, rtol=0), (k, (fsdp[k] - one[k]).abs().max())


def test_a_stopped_fsdp_run_resumes_bit_for_bit(latent_ckpt, tmp_path):
    """LaDi-RL with its text policy: the plan policy whole on every rank, the decoder sharded."""
    flags = ["--algo", "ladi", "--init", str(latent_ckpt), "--preset", "smoke", "--steps", "4", "--save-every", "2",
             "--eval-questions", "2", "--threads", "1", "--text-policy-coef", "1", "--text-lr", "1e-4", "--fsdp",
             "--format-weight", "0.5"]  # format rewards: gradients that move both policies
    run([*TORCHRUN, "--master_port", str(free_port()), "-m", "training.rl", *flags, "--out", str(tmp_path / "a")])
    stopper = str(Path(__file__).with_name("rl_stopped_at.py"))
    r = run([*TORCHRUN, "--master_port", str(free_port()), stopper, "3", *flags, "--out", str(tmp_path / "b")],
            ok=False)
    assert r.returncode != 0 and (tmp_path / "b.work" / "fsdp_state").is_dir()
    r = run([*TORCHRUN, "--master_port", str(free_port()), "-m", "training.rl", *flags, "--out", str(tmp_path / "b"),
             "--resume"])
    assert "resuming at step 2" in r.stdout
    init, a, b = weights(latent_ckpt), weights(tmp_path / "a"), weights(tmp_path / "b")
    assert any(not torch.equal(init[k], a[k]) for k in a)  # the decoder trained
    assert all(torch.equal(a[k], b[k]) for k in a)
    p0, pa, pb = (load_file(d / "policy.safetensors") for d in (latent_ckpt, tmp_path / "a", tmp_path / "b"))
    assert any(not torch.equal(p0[k], pa[k]) for k in pa) and all(torch.equal(pa[k], pb[k]) for k in pa)
    lines = lambda d: [json.loads(x) for x in (d.with_name(d.name + ".work") / "metrics.jsonl").read_text().splitlines()
                       if '"stage"' not in x]  # noqa: E731
    drop = ("samples_per_s", "step_s", "rollout_s", "time")
    same = lambda rows: [{k: v for k, v in x.items() if k not in drop} for x in rows]  # noqa: E731
    assert [x["step"] for x in lines(tmp_path / "b")] == [0, 1, 2, 3]  # each step once after the resume
    assert same(lines(tmp_path / "a")) == same(lines(tmp_path / "b"))


@pytest.mark.parametrize("algo,init,why", [("dlr", "dlr_ckpt", "nothing to shard"),
                                           ("coconut-grpo", "recurrent_ckpt", "thinks with the decoder")])
def test_what_cannot_be_sharded_is_refused_with_the_reason(algo, init, why, request, tmp_path):
    from training import rl

    with pytest.raises(SystemExit, match=why):
        rl.main(["--algo", algo, "--init", str(request.getfixturevalue(init)), "--preset", "smoke", "--fsdp",
                 "--out", str(tmp_path / "x")])
