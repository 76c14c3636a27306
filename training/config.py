"""Typed configuration for the supervised stages, with the `smoke` and `demo` presets."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from ladi_core.codec import CodecConfig
from ladi_core.decoder import DecoderConfig
from ladi_core.policies import DiffusionPolicyConfig, SamplerConfig
from ladi_core.tasks import CountdownConfig

from .common import Precision


@dataclass(frozen=True)
class StageConfig:
    steps: int
    batch_size: int
    lr: float
    warmup: int = 50
    weight_decay: float = 0.01


@dataclass(frozen=True)
class CheckpointStageConfig:
    """What every stage that turns one checkpoint into another shares (the writer, the prior's
    rollout stage): the task, seed, resumable-state cadence and the held-out check at the end."""

    task: str = "countdown"
    seed: int = 0
    save_every: int = 200
    eval_questions: int = 64
    eval_samples: int = 4
    max_new_tokens: int = 96
    threads: int = 0
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (the GPU when there is one)
    precision: Precision = "fp32"  # bf16: forward passes under autocast, float32 weights

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass(frozen=True)
class SFTConfig:
    task: str = "countdown"
    verifier: str | None = None  # for JSONL tasks: math | code
    seed: int = 0
    decoder_init: str | None = None  # a local HF model directory instead of a tiny decoder from scratch
    countdown: CountdownConfig = field(default_factory=CountdownConfig)  # the demo difficulty
    decoder: DecoderConfig = DecoderConfig(num_layers=3, intermediate_size=384)
    codec: CodecConfig = field(default_factory=CodecConfig)
    policy: DiffusionPolicyConfig = field(default_factory=DiffusionPolicyConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # The decoder: held-out pass@1 climbs steeply with its steps, and at equal wall time 3000 steps
    # of 64 beat 1250 of 128 (29% vs 20% pass@1 on 300 held-out questions). The demo preset below
    # sets the codec and prior budgets (LaDiR's codec needs thousands of steps to read back).
    decoder_stage: StageConfig = StageConfig(3000, 64, 3e-3, warmup=100)
    codec_stage: StageConfig = StageConfig(250, 128, 1e-3)
    prior_stage: StageConfig = StageConfig(500, 128, 1e-3)
    stats_examples: int = 4096  # examples used to measure the latent mean/std
    save_every: int = 200  # resumable state every this many steps
    eval_questions: int = 64  # quick held-out check recorded in each checkpoint's provenance
    eval_samples: int = 4
    max_new_tokens: int = 96
    threads: int = 0  # torch threads; 0 = all cores
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (this process's GPU when there is one)
    precision: Precision = "fp32"  # bf16: forward passes under autocast, float32 weights (GPU runs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# LaDiR's codec: the decoder reads only [bot; adapter(z); eot] (never the question), 30% of the
# encoder's input tokens are substituted, latent noise 0.3. Measured on the demo task (500 held-out
# questions, results/ladir-codec): after 3000 codec steps, reconstruction 89.1% and ceiling pass@1
# 91.2, where the question-seeing codec with half the reasoning hidden had 1.6% and 4.5.
LADIR_CODEC = CodecConfig(decoder_sees_question=False, token_substitution=0.3, latent_noise=0.3, cot_dropout=0.0)

# The plan codec (a conditional VAE, measured and not adopted): the decoder sees the question and z
# is meant to carry only the choice of solution under an information budget (kl_weight 1, free
# bits), so that a plan drawn from noise decodes like the token model. It collapses: after 1200
# codec steps z holds ~1 nat, 8 plans decode to one greedy text (plan_texts 1.0, reconstruction 0),
# pass@1 33.2 on 64 held-out questions (the token model: 28.1), i.e. the token model with an unread
# plan. KL annealing (logvar_init -6, kl_warmup 0.3) plus 25% of the reasoning hidden from the
# decoder did not make z read either (plan_texts 1.0) and cost accuracy (pass@1 19.1).
PLAN_CODEC = CodecConfig(latent_dim=8, decoder_sees_question=True, cot_dropout=0.0, token_substitution=0.0,
                         latent_noise=0.0, logvar_init=0.0, kl_weight=1.0, free_bits=0.25)

PRESETS: dict[str, SFTConfig] = {
    # `make demo`'s SFT stage: token SFT, then LaDiR's codec and the prior (37.8 min on 2 cores)
    "demo": SFTConfig(
        codec=LADIR_CODEC,
        codec_stage=StageConfig(3000, 64, 1e-3, warmup=100),
        prior_stage=StageConfig(2000, 64, 1e-3, warmup=100),
    ),
    # the plan codec on an existing token decoder (`--decoder-init checkpoints/demo-token/decoder`)
    "demo-plan": SFTConfig(
        codec=PLAN_CODEC,
        decoder_stage=StageConfig(0, 64, 3e-3, warmup=0),
        codec_stage=StageConfig(1200, 64, 1e-3, warmup=100),
        prior_stage=StageConfig(1000, 64, 1e-3, warmup=100),
    ),
    # the smoke codec is LaDiR's: in 240 steps its plans already carry the reasoning (teacher-forced
    # loss 0.44 nats/token given a text's own latent against 0.87 given another's; 7.9 of 8 plans
    # decode to distinct texts), where the question-seeing codec's 60 steps left z unread (1.0816 vs 1.0819)
    "smoke": SFTConfig(
        decoder=DecoderConfig(num_layers=2, intermediate_size=256),
        codec=replace(LADIR_CODEC, enc_layers=1),
        policy=DiffusionPolicyConfig(layers=2),
        sampler=SamplerConfig(steps=8),
        decoder_stage=StageConfig(120, 64, 3e-3, warmup=10),
        codec_stage=StageConfig(240, 64, 2e-3, warmup=10),
        prior_stage=StageConfig(80, 64, 1e-3, warmup=10),
        stats_examples=256, save_every=40, eval_questions=16, eval_samples=2, max_new_tokens=64,
    ),
    # A pretrained chat model of ~1.5B parameters on one GPU (`--decoder-init DIR`, e.g. a local
    # Qwen2.5-1.5B-Instruct): mixed precision, batches and learning rates for fine-tuning a
    # pretrained decoder, a codec and a prior wide enough for its 1,536-wide embeddings, and longer
    # texts. Memory (estimated, not yet measured on a GPU): ~25 GB of float32 weights, gradients and
    # AdamW state plus ~15 GB of bf16 activations at batch 16: one 80 GB (or 48 GB) GPU.
    "qwen2.5-1.5b": SFTConfig(
        precision="bf16",
        codec=replace(LADIR_CODEC, latent_tokens=8, enc_dim=512, enc_layers=4, enc_heads=8, max_len=512),
        policy=DiffusionPolicyConfig(d_model=512, layers=6, encoder_layers=2, heads=8, max_cond_len=512),
        decoder_stage=StageConfig(1000, 16, 1e-5, warmup=50),
        codec_stage=StageConfig(3000, 16, 1e-4, warmup=100),
        prior_stage=StageConfig(3000, 64, 3e-4, warmup=100),
        save_every=250, eval_questions=64, eval_samples=4, max_new_tokens=256,
    ),
}


def with_overrides(cfg, **kw):
    """replace() that ignores None values (CLI flags left unset)."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})

