"""The policy contract (ladi_core/policies/base.py) is all that the rest of LaDi relies on: a fourth
kind, defined in this file alone plus its registry line, is saved, loaded and served through the
real app by the OpenAI SDK, in sample and best_of_n modes."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from openai import OpenAI
from torch import nn

from ladi_core.checkpoint import load_checkpoint, make_provenance, save_checkpoint
from ladi_core.decoder import load_decoder
from ladi_core.generation import Reasoner
from ladi_core.policies import POLICY_KINDS, LatentPolicy, PlanSample, register_policy
from server.app import create_app
from server.config import Limits, ServerConfig

from .live import LiveServer


@dataclass(frozen=True)
class CentroidConfig:
    latent_tokens: int
    latent_dim: int
    hidden_size: int


@dataclass(frozen=True)
class CentroidSampler:
    scale: float = 1.0  # the plans' spread around the question's centroid


class CentroidPolicy(LatentPolicy):
    """The smallest plan policy: a linear map of the question's mean embedding, plus scaled noise."""

    kind = "test-centroid"
    overrides = frozenset({"scale"})

    def __init__(self, cfg: CentroidConfig, sampler: CentroidSampler | None = None):
        super().__init__()
        self.cfg, self.sampler = cfg, sampler or CentroidSampler()
        self.proj = nn.Linear(cfg.hidden_size, cfg.latent_tokens * cfg.latent_dim)

    def sample(self, cond, cond_mask, num_plans, *, generator=None, sde=False, init_noise=None, **overrides):
        counts = self.plan_counts(cond, num_plans)
        sc = self.settings(**overrides)
        keep = cond_mask[..., None].to(cond.dtype)
        centroid = (cond * keep).sum(1) / keep.sum(1)
        mean = self.proj(centroid).view(-1, *self.latent_shape)
        mean = mean.repeat_interleave(torch.tensor(counts), 0)
        if init_noise is None:
            init_noise = torch.randn(mean.shape, generator=generator)
        return PlanSample(mean + sc.scale * init_noise, counts[0] if len(set(counts)) == 1 else counts, settings=sc)


@pytest.fixture
def centroid_ckpt(latent_ckpt, tmp_path, monkeypatch):
    """The smoke checkpoint's decoder and codec with a fresh centroid policy in place of its prior."""
    monkeypatch.setitem(POLICY_KINDS, CentroidPolicy.kind, POLICY_KINDS.get(CentroidPolicy.kind))
    register_policy(CentroidPolicy, CentroidConfig, CentroidSampler)  # the registry line
    base = load_checkpoint(latent_ckpt)
    torch.manual_seed(0)
    codec = base.codec.cfg
    policy = CentroidPolicy(CentroidConfig(codec.latent_tokens, codec.latent_dim, codec.hidden_size),
                            CentroidSampler(scale=2.0))
    decoder, tok = load_decoder(base.decoder_dir)
    return save_checkpoint(tmp_path / "centroid", decoder, tok, make_provenance("test", 0), task=base.config.task,
                           codec=base.codec, policy=policy)


def test_a_fourth_policy_kind_is_served_through_the_sdk(centroid_ckpt):
    ck = load_checkpoint(centroid_ckpt)
    assert isinstance(ck.policy, CentroidPolicy) and ck.policy.sampler.scale == 2.0  # loaded, not rebuilt
    r = Reasoner.from_checkpoint(centroid_ckpt)
    cfg = ServerConfig(checkpoint=str(centroid_ckpt), limits=Limits(max_n=8, max_best_of=16, max_tokens=32))
    with LiveServer(create_app(cfg, r, r.backend.name)) as live:
        client = OpenAI(base_url=live.url + "/v1", api_key="x")
        msgs = [{"role": "user", "content": "Use 3 4 5 2 to make 23."}]
        models = client.models.list().data
        assert models[0].model_extra["ladi"]["policy"] == "test-centroid"

        sample = client.chat.completions.create(model=models[0].id, messages=msgs, n=4, max_tokens=24, seed=3,
                                                extra_body={"latent_plans": 4})
        assert len(sample.choices) == 4
        assert sorted(c.model_extra["plan_index"] for c in sample.choices) == [0, 1, 2, 3]
        assert sample.model_extra["ladi"]["latent_plans"] == 4
        assert sample.model_extra["ladi"]["plan_distance"] > 0  # four distinct plans, from the seeded noise
        again = client.chat.completions.create(model=models[0].id, messages=msgs, n=4, max_tokens=24, seed=3,
                                               extra_body={"latent_plans": 4})
        assert [c.message.content for c in again.choices] == [c.message.content for c in sample.choices]

        best = client.chat.completions.create(model=models[0].id, messages=msgs, n=2, max_tokens=24, seed=3,
                                              extra_body={"mode": "best_of_n", "best_of": 6,
                                                          "verifier": "likelihood"})
        scores = [c.model_extra["score"] for c in best.choices]
        assert len(scores) == 2 and scores[0] >= scores[1]  # ranked by mean token log-prob

        # the policy declares no request settings: a diffusion knob is refused by name, before any work
        from openai import BadRequestError

        with pytest.raises(BadRequestError, match="denoising_steps does not apply to the test-centroid policy"):
            client.chat.completions.create(model=models[0].id, messages=msgs, max_tokens=8,
                                           extra_body={"denoising_steps": 4})
