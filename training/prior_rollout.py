"""LaDiR's stage 2 (rollout training): the prior learns from the decoder's answer loss, through its own plans.

    python -m training.prior_rollout --init checkpoints/demo-ladir --out checkpoints/demo-ladir-s2 \
        [--preset demo] [--seed S] [--steps N] [--references K] [--resume]

Flow matching teaches the prior where reference posteriors lie, not which of its own samples the
decoder can use: a plan a little off the posterior can decode to nonsense. Here the prior draws a
plan from noise with the sampler itself (`DiffusionPolicy.sample`, the ODE, as many
steps as serving uses), the decoder reads `[prompt; bot; adapter(plan); eot]`, and the cross-entropy
of a reference solution flows back through every denoising step into the denoiser. The flow-matching
loss stays in the objective (LaDiR: against latent collapse). The decoder, the codec and the latent
statistics are frozen, bit for bit; the output samples with `denoising_steps` by default.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ladi_core.checkpoint import command_line, exit_on_user_error, git_commit, load_checkpoint
from ladi_core.codec import build_inputs_embeds
from ladi_core.decoder import load_decoder
from ladi_core.generation import pad_embeds
from ladi_core.tasks import get_task

from .common import MetricsLog, Placement, pad_batch, set_threads, teacher_forcing
from .config import CheckpointStageConfig, StageConfig
from .stage import (
    Examples,
    checkpoint_stage_config,
    checkpoint_stage_parser,
    finish_checkpoint_stage,
    open_work_dir,
    run_stage,
)


@dataclass(frozen=True)
class PriorRolloutConfig(CheckpointStageConfig):
    # Measured on the demo task (200 held-out questions x 32 plans, 5 denoising steps) from the
    # writer checkpoint (pass@1 18.2): 600 steps -> 23.5, pass@8 74.6 -> 79.9.
    stage: StageConfig = StageConfig(600, 64, 3e-4, warmup=20)
    denoising_steps: int = 5  # ODE steps a training plan is drawn with (and the output's sampling default)
    flow_matching_weight: float = 1.0  # the prior's own SFT loss, kept beside the answer loss
    references: int = 1  # reference solutions per question the answer loss takes the best of


PRESETS: dict[str, PriorRolloutConfig] = {
    "demo": PriorRolloutConfig(),
    "smoke": PriorRolloutConfig(stage=StageConfig(12, 16, 1e-3, warmup=2), denoising_steps=3, save_every=6,
                                eval_questions=8, eval_samples=2, max_new_tokens=64),
    # the sft preset of the same name's checkpoint (a ~1.5B chat model; untested on a GPU yet)
    "qwen2.5-1.5b": PriorRolloutConfig(stage=StageConfig(600, 16, 3e-4, warmup=20), precision="bf16",
                                       save_every=100, max_new_tokens=256),
}


def answer_loss(decoder, codec, prompt_embeds: list[torch.Tensor], latents: torch.Tensor,
                refs: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of a reference completion given each row's plan (latents [rows, L, d_z], with
    whatever gradient they carry), the decoder reading `[prompt; bot; adapter(plan); eot]`.
    refs: each row's reference completions; a plan is scored by the one it explains best
    (per-token mean), so plans drawn from different noise may settle on different solutions
    instead of all being pulled to one. Returns the loss, token-weighted over the chosen
    references (with one reference each: the decoder's own mean cross-entropy), and each row's
    chosen reference [rows]."""
    embed = decoder.get_input_embeddings()
    prefixes = codec.prefixes(prompt_embeds, latents)
    k = len(refs[0])
    if any(len(r) != k for r in refs):
        raise ValueError("every question needs the same number of references")
    x, mask, lab = teacher_forcing([pre for pre, rs in zip(prefixes, refs) for _ in rs],
                                   [c for rs in refs for c in rs], embed)
    logits = decoder(inputs_embeds=x, attention_mask=mask.long()).logits[:, :-1].float()
    target = lab[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    sums = ce.sum(1).view(len(refs), k)
    counts = (target != -100).sum(1).view(len(refs), k)
    best = (sums / counts).argmin(1, keepdim=True)  # which reference each plan explains best
    return sums.gather(1, best).sum() / counts.gather(1, best).sum(), best.squeeze(1)


def answer_loss_through_plans(decoder, codec, policy, prompt_embeds: list[torch.Tensor], cond: torch.Tensor,
                              cond_mask: torch.Tensor, refs: list[list[list[int]]], steps: int,
                              gen: torch.Generator) -> torch.Tensor:
    """`answer_loss` of one plan per question that the prior draws from noise
    (`DiffusionPolicy.sample`'s ODE, with the gradient kept through every step into the denoiser).
    cond, cond_mask: the padded prompt embeddings, the condition every sample reads."""
    latents = policy.sample(cond, cond_mask, 1, generator=gen, steps=steps).latents
    return answer_loss(decoder, codec, prompt_embeds, latents, refs)[0]


def parse_args(argv=None):
    p = checkpoint_stage_parser("python -m training.prior_rollout", __doc__, PRESETS,
                                "a latent checkpoint (the writer's)")
    p.add_argument("--references", type=int,
                   help="reference solutions per question; each plan's answer loss takes the one it explains best")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    cfg = checkpoint_stage_config(PRESETS, args, references=args.references)
    if cfg.references < 1:
        raise SystemExit("--references must be at least 1")
    set_threads(cfg.threads)
    place = Placement.resolve(cfg.device, cfg.precision)
    init, out = Path(args.init), Path(args.out)
    ck = load_checkpoint(init, str(place.device))
    if not ck.is_latent:
        raise SystemExit(f"{init} is a token-level checkpoint: the rollout stage trains a latent checkpoint's prior")
    work = open_work_dir(out, cfg.to_json(), args.resume)
    print(f"training.prior_rollout preset={args.preset} init={init} on {place}\n{cfg.to_json()}", flush=True)
    command, commit, t0 = command_line("training.prior_rollout", argv), git_commit(), time.time()

    task = get_task(cfg.task)
    decoder, tokenizer = load_decoder(ck.decoder_dir, device=place.device)
    codec, policy = ck.codec, ck.policy
    decoder.eval()
    for prm in list(decoder.parameters()) + list(codec.parameters()):
        prm.requires_grad_(False)  # the decoder and the plan space stay as they are
    embed = decoder.get_input_embeddings()
    data, pad = Examples(task, tokenizer), tokenizer.pad_token_id

    def loss_fn(rng, gen, progress):
        prompts, refs = data.batch_with_references(cfg.stage.batch_size, rng, cfg.references)
        prompt_embeds = build_inputs_embeds(embed, prompts)  # frozen: no gradient
        cond, cond_mask = pad_embeds(prompt_embeds)
        ce = answer_loss_through_plans(decoder, codec, policy, prompt_embeds, cond, cond_mask, refs,
                                       cfg.denoising_steps, gen)
        ids, mask = pad_batch([p + rs[0] for p, rs in zip(prompts, refs)], pad)
        ids, mask = ids.to(place.device), mask.to(place.device)
        with torch.no_grad():
            mu, _ = codec.encoder(embed(ids), mask)
        fm = policy.flow_matching_loss(codec.normalize(mu), cond, cond_mask, gen)
        return ce + cfg.flow_matching_weight * fm, {"ce": round(ce.item(), 5), "fm": round(fm.item(), 5)}

    log = MetricsLog(work / "metrics.jsonl")
    run_stage("prior_rollout", cfg.stage, {"policy": policy}, list(policy.parameters()), loss_fn, cfg, work, log,
              place)
    policy.sampler = replace(policy.sampler, steps=cfg.denoising_steps)
    metrics = {"stage": "prior_rollout", "init": str(init), "prior_rollout_s": round(time.time() - t0, 1)}
    return finish_checkpoint_stage(out, decoder, tokenizer, codec, policy, task=task, task_name=ck.config.task,
                                   cfg=cfg, command=command, commit=commit, metrics=metrics, log=log)


if __name__ == "__main__":
    exit_on_user_error(main)  # a failed run raises, and Python exits non-zero
