"""training.average: WiSE-FT's tensor-by-tensor mix of a trained checkpoint with its start."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ladi_core.checkpoint import CheckpointError, read_config
from training.average import average_state, main


def test_average_state_mixes_floats_and_keeps_equal_integers():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor([2])}
    b = {"w": torch.tensor([5.0, -1.0]), "n": torch.tensor([2])}
    out = average_state(a, b, 0.25, "x")
    assert torch.allclose(out["w"], torch.tensor([0.25 * 1 + 0.75 * 5, 0.25 * 3 + 0.75 * -1]))
    assert torch.equal(out["n"], torch.tensor([2]))
    with pytest.raises(CheckpointError, match="integer tensor n"):
        average_state(a, {**b, "n": torch.tensor([3])}, 0.5, "x")
    with pytest.raises(CheckpointError, match="shape"):
        average_state(a, {**b, "w": torch.zeros(3)}, 0.5, "x")


def test_a_mixed_checkpoint_lies_between_its_parents(latent_ckpt, tmp_path):
    """The smoke latent checkpoint mixed with a copy whose weights are all moved by +1: every
    floating tensor lands at weight x 1 of the way, and the result loads and records its parents."""
    import shutil

    from safetensors.torch import save_file

    moved = tmp_path / "moved"
    shutil.copytree(latent_ckpt, moved)
    for f in ("decoder/model.safetensors", "codec.safetensors", "policy.safetensors"):
        t = load_file(moved / f)
        save_file({k: v + 1 if v.is_floating_point() else v for k, v in t.items()}, moved / f)
    out = main(["--checkpoint", str(moved), "--start", str(latent_ckpt), "--weight", "0.3", "--out",
                str(tmp_path / "mixed")])
    for f in ("decoder/model.safetensors", "codec.safetensors", "policy.safetensors"):
        start, mixed = load_file(latent_ckpt / f), load_file(out / f)
        for k, v in start.items():
            if v.is_floating_point():
                assert torch.allclose(mixed[k], v + 0.3, atol=1e-5), (f, k)
    prov = read_config(out).provenance
    assert prov.metrics["averaged_from"] == {"checkpoint": str(moved), "start": str(latent_ckpt), "weight": 0.3}
    assert "training.average" in prov.command


def test_mixing_a_token_checkpoint_with_a_latent_one_is_a_one_line_error(latent_ckpt, token_ckpt, tmp_path):
    r = subprocess.run([sys.executable, "-m", "training.average", "--checkpoint", str(latent_ckpt), "--start",
                        str(token_ckpt), "--weight", "0.5", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "different kinds" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
