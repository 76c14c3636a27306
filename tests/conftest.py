"""Shared fixtures. The smoke pipeline (all three supervised stages on the tiny preset) runs once per
session; the checkpoint, generation and evaluation tests read what it wrote."""
import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """Runs `python -m training.sft --preset smoke` in-process; returns the latent checkpoint path.

    LADI_SMOKE_DIR (a developer's shortcut, never set in CI) reuses a smoke run kept there."""
    from training import sft

    keep = os.environ.get("LADI_SMOKE_DIR")
    out = Path(keep) / "ckpt" if keep else tmp_path_factory.mktemp("smoke") / "ckpt"
    if not (keep and (out / "ladi.json").is_file()):
        shutil.rmtree(out.with_name("ckpt.work"), ignore_errors=True)
        sft.main(["--task", "countdown", "--preset", "smoke", "--out", str(out), "--seed", "0"])
    return out


@pytest.fixture(scope="session")
def latent_ckpt(smoke_run) -> Path:
    return smoke_run


@pytest.fixture(scope="session")
def token_ckpt(smoke_run) -> Path:
    return smoke_run.with_name(smoke_run.name + "-token")


@pytest.fixture(scope="session")
def latent_reasoner(latent_ckpt):
    from ladi_core.generation import Reasoner

    return Reasoner.from_checkpoint(latent_ckpt)


@pytest.fixture(scope="session")
def token_reasoner(token_ckpt):
    from ladi_core.generation import Reasoner

    return Reasoner.from_checkpoint(token_ckpt)
