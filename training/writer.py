"""The writer stage: the decoder learns to write a solution from the question *and* a plan.

    python -m training.writer --init checkpoints/demo --out checkpoints/demo-ladir \
        [--decoder-from checkpoints/demo-token] [--preset demo] [--seed S] [--resume]

LaDiR trains its codec with a decoder that never sees the question, so z has to carry the whole
reasoning and cannot be ignored (`CodecConfig.decoder_sees_question=False`). At inference its LLM
then writes the answer seeing the question and the latents. A question-free decoder has no way to
notice that a sampled plan's arithmetic does not fit the question's numbers; a writer that reads
`[prompt; bot; adapter(z); eot]` does. This stage turns the first into the second: the codec's
encoder and the diffusion prior stay frozen (the plan space, its normalisation and every plan the
prior draws are unchanged), and the decoder with the codec's adapter is fine-tuned on reference
solutions from their own posterior plus `latent_noise`. The plan is not ignored: z still names the
one reference solution to write among the many a question has, which the question alone cannot.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from ladi_core.checkpoint import command_line, exit_on_user_error, git_commit, load_checkpoint
from ladi_core.decoder import load_decoder
from ladi_core.tasks import get_task

from .common import MetricsLog, Placement, set_threads
from .config import CheckpointStageConfig, StageConfig
from .stage import (
    Examples,
    checkpoint_stage_config,
    checkpoint_stage_parser,
    finish_checkpoint_stage,
    latent_reconstruction_loss,
    open_work_dir,
    run_stage,
)


@dataclass(frozen=True)
class WriterConfig(CheckpointStageConfig):
    decoder_from: str | None = None  # a checkpoint whose decoder the writer starts from (default: --init's)
    # Measured on the demo task (200 held-out questions x 32 plans of the demo prior, 20 denoising
    # steps; the question-free decoder: pass@1 4.8): 1500 steps from the latent decoder with noise
    # 0.3 give 11.7; from the token SFT decoder with noise 0.5, 16.8; with noise 1.0, 18.0 (pass@32
    # 97.5). Each still reads its plan: 7.3 distinct greedy texts from 8 plans.
    stage: StageConfig = StageConfig(1500, 64, 1e-3, warmup=50)
    latent_noise: float = 1.0  # on z while training (the latents' std is 1-2): a writer robust to imperfect plans
    token_substitution: float = 0.3  # of the encoder's input tokens (the codec stage's setting)


PRESETS: dict[str, WriterConfig] = {
    "demo": WriterConfig(),
    "smoke": WriterConfig(stage=StageConfig(40, 32, 2e-3, warmup=5), save_every=20, eval_questions=8,
                          eval_samples=2, max_new_tokens=64),
    # the sft preset of the same name's checkpoint (a ~1.5B chat model): mixed precision, a
    # pretrained decoder's learning rate (untested on a GPU yet)
    "qwen2.5-1.5b": WriterConfig(stage=StageConfig(1500, 16, 2e-5, warmup=50), precision="bf16", save_every=250,
                                 max_new_tokens=256),
}


def parse_args(argv=None):
    p = checkpoint_stage_parser("python -m training.writer", __doc__, PRESETS,
                                "a latent checkpoint whose decoder does not see the question")
    p.add_argument("--decoder-from", help="start the writer from this checkpoint's decoder (e.g. the token SFT "
                   "one, which already solves the task from the question) instead of --init's")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    cfg = checkpoint_stage_config(PRESETS, args, decoder_from=args.decoder_from)
    set_threads(cfg.threads)
    place = Placement.resolve(cfg.device, cfg.precision)
    init, out = Path(args.init), Path(args.out)
    ck = load_checkpoint(init, str(place.device))
    if not ck.is_latent:
        raise SystemExit(f"{init} is a token-level checkpoint: the writer stage needs a codec and a prior")
    if ck.codec.cfg.decoder_sees_question:
        raise SystemExit(f"{init}'s decoder already sees the question: the writer stage is for a "
                         f"question-free codec (CodecConfig.decoder_sees_question=False)")
    work = open_work_dir(out, cfg.to_json(), args.resume)
    print(f"training.writer preset={args.preset} init={init} on {place}\n{cfg.to_json()}", flush=True)
    command, commit, t0 = command_line("training.writer", argv), git_commit(), time.time()

    task = get_task(cfg.task)
    source = load_checkpoint(cfg.decoder_from) if cfg.decoder_from else ck
    decoder, tokenizer = load_decoder(source.decoder_dir, device=place.device)
    if decoder.config.hidden_size != ck.codec.cfg.hidden_size or len(tokenizer) != len(ck.tokenizer):
        raise SystemExit(f"--decoder-from {cfg.decoder_from}: its decoder (hidden size {decoder.config.hidden_size}, "
                         f"{len(tokenizer)} tokens) does not fit {init}'s codec (hidden size "
                         f"{ck.codec.cfg.hidden_size}, {len(ck.tokenizer)} tokens)")
    codec, policy = ck.codec, ck.policy
    codec.cfg = replace(codec.cfg, decoder_sees_question=True, cot_dropout=0.0, latent_noise=cfg.latent_noise,
                        token_substitution=cfg.token_substitution)
    for prm in list(codec.encoder.parameters()) + list(policy.parameters()):
        prm.requires_grad_(False)  # the plan space and the prior stay as they are
    data, pad = Examples(task, tokenizer), tokenizer.pad_token_id

    def writer_loss(rng, gen, progress):
        prompts, comps = data.batch(cfg.stage.batch_size, rng)
        return latent_reconstruction_loss(decoder, codec, prompts, comps, pad, gen, progress)

    log = MetricsLog(work / "metrics.jsonl")
    run_stage("writer", cfg.stage, {"decoder": decoder, "adapter": codec.adapter},
              list(decoder.parameters()) + list(codec.adapter.parameters()), writer_loss, cfg, work, log, place)
    metrics = {"stage": "writer", "init": str(init), "decoder_from": str(source.path),
               "writer_s": round(time.time() - t0, 1)}
    return finish_checkpoint_stage(out, decoder, tokenizer, codec, policy, task=task, task_name=ck.config.task,
                                   cfg=cfg, command=command, commit=commit, metrics=metrics, log=log)


if __name__ == "__main__":
    exit_on_user_error(main)  # a failed run raises, and Python exits non-zero
