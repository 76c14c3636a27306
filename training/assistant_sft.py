"""DLR's warm-up (SoftCoT's supervised stage): an assistant learns to propose plans that a frozen
decoder turns into the reference reasoning.

    python -m training.assistant_sft --init checkpoints/demo-ladir --out checkpoints/demo-dlr-sft \
        [--preset demo] [--seed S] [--steps N] [--references R] [--resume]

The main model is a latent checkpoint's decoder and codec, frozen bit for bit: the decoder already
reads plans through the codec's adapter, and the assistant (`AssistantPolicy`) replaces only the
diffusion prior. Each step, every question gets one plan per slot (K learned slot embeddings, a
reparameterised Gaussian draw each), the decoder reads `[prompt; bot; adapter(plan); eot]`, and the
cross-entropy of the reference solution each plan explains best flows back into the assistant. So
different slots may settle on different solutions of the same question. Beside it, each plan's
mean is pulled towards the posterior latent of that same reference (the codec's encoder, frozen), a
direct target that speeds the start; an optional InfoNCE term keeps a question's slots apart.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ladi_core.checkpoint import command_line, exit_on_user_error, git_commit, load_checkpoint
from ladi_core.codec import build_inputs_embeds
from ladi_core.decoder import load_decoder
from ladi_core.generation import pad_embeds
from ladi_core.policies import AssistantPolicy, AssistantPolicyConfig, info_nce
from ladi_core.tasks import get_task

from . import stage
from .common import MetricsLog, Placement, pad_batch, set_threads
from .config import CheckpointStageConfig, StageConfig
from .prior_rollout import answer_loss


@dataclass(frozen=True)
class AssistantSFTConfig(CheckpointStageConfig):
    stage: StageConfig = StageConfig(400, 16, 1e-3, warmup=20)  # batch: questions (each x slots plans)
    assistant: AssistantPolicyConfig = field(default_factory=AssistantPolicyConfig)  # shapes come from the codec
    references: int = 2  # reference solutions per question; each plan takes the one it explains best
    posterior_weight: float = 1.0  # pull each plan's mean to its chosen reference's posterior latent
    contrastive_weight: float = 0.0  # InfoNCE over a question's slots (DLR's RL stage uses it)
    contrastive_tau: float = 0.05


PRESETS: dict[str, AssistantSFTConfig] = {
    "demo": AssistantSFTConfig(),
    "smoke": AssistantSFTConfig(stage=StageConfig(10, 4, 1e-3, warmup=2),
                                assistant=AssistantPolicyConfig(d_model=32, layers=1, encoder_layers=1, heads=2,
                                                                slots=4),
                                save_every=5, eval_questions=8, eval_samples=2, max_new_tokens=64),
}


def warmup_loss(decoder, codec, assistant: AssistantPolicy, prompts: list[list[int]], refs: list[list[list[int]]],
                cfg: AssistantSFTConfig, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The stage's objective on one batch: prompts [Q] token ids, refs [Q][R] reference completions."""
    embed = decoder.get_input_embeddings()
    k = assistant.cfg.slots
    dev = embed.weight.device
    prompt_embeds = build_inputs_embeds(embed, prompts)  # frozen: no gradient
    cond, mask = pad_embeds(prompt_embeds)
    plans = assistant.sample(cond, mask, k, generator=gen, sde=True)  # reparameterised: grad reaches the assistant
    rows = [e for e in prompt_embeds for _ in range(k)]
    ce, best = answer_loss(decoder, codec, rows, plans.latents, [rs for rs in refs for _ in range(k)])
    loss, stats = ce, {"ce": round(ce.item(), 5)}
    mean = plans.trajectory[0]  # [Q * K, L, d_z]
    if cfg.posterior_weight:
        r = len(refs[0])
        ids, ids_mask = pad_batch([p + c for p, rs in zip(prompts, refs) for c in rs], 0)
        ids, ids_mask = ids.to(dev), ids_mask.to(dev)
        with torch.no_grad():
            mu, _ = codec.encoder(embed(ids), ids_mask)
            target = codec.normalize(mu).view(len(prompts), r, *mu.shape[1:])
        chosen = target.repeat_interleave(k, 0)[torch.arange(len(best), device=dev), best]
        post = F.mse_loss(mean, chosen)
        loss = loss + cfg.posterior_weight * post
        stats["posterior"] = round(post.item(), 5)
    if cfg.contrastive_weight:
        flat = mean.flatten(1).view(len(prompts), k, -1)
        nce = info_nce(flat, F.dropout(flat, assistant.cfg.dropout, training=True), cfg.contrastive_tau)
        loss = loss + cfg.contrastive_weight * nce
        stats["info_nce"] = round(nce.item(), 5)
    stats["std"] = round(assistant.std().mean().item(), 5)
    return loss, stats


def parse_args(argv=None):
    p = stage.checkpoint_stage_parser("python -m training.assistant_sft", __doc__, PRESETS,
                                "a latent checkpoint whose decoder and codec the assistant serves (frozen)")
    p.add_argument("--references", type=int, help="reference solutions per question (each plan takes its best)")
    p.add_argument("--slots", type=int, help="K: distinct plan means per question")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    cfg = stage.checkpoint_stage_config(PRESETS, args, references=args.references)
    if args.slots is not None:
        cfg = replace(cfg, assistant=replace(cfg.assistant, slots=args.slots))
    if cfg.references < 1 or cfg.assistant.slots < 1:
        raise SystemExit("--references and --slots must be at least 1")
    set_threads(cfg.threads)
    place = Placement.resolve(cfg.device, cfg.precision)
    init, out = Path(args.init), Path(args.out)
    ck = load_checkpoint(init, str(place.device))
    if not ck.is_latent:
        raise SystemExit(f"{init} is a token-level checkpoint: the assistant needs a decoder that reads plans "
                         "(a latent checkpoint's decoder and codec)")
    work = stage.open_work_dir(out, cfg.to_json(), args.resume)
    print(f"training.assistant_sft preset={args.preset} init={init} on {place}\n{cfg.to_json()}", flush=True)
    command, commit, t0 = command_line("training.assistant_sft", argv), git_commit(), time.time()

    task = get_task(cfg.task)
    decoder, tokenizer = load_decoder(ck.decoder_dir, device=place.device)
    codec = ck.codec
    decoder.eval()
    for prm in list(decoder.parameters()) + list(codec.parameters()):
        prm.requires_grad_(False)  # the main model and the plan space stay as they are
    c = codec.cfg
    torch.manual_seed(cfg.seed)  # the assistant's initial weights
    assistant = AssistantPolicy(replace(cfg.assistant, hidden_size=c.hidden_size, latent_tokens=c.latent_tokens,
                                        latent_dim=c.latent_dim)).to(place.device)
    data = stage.Examples(task, tokenizer)

    def loss_fn(rng, gen, progress):
        prompts, refs = data.batch_with_references(cfg.stage.batch_size, rng, cfg.references)
        return warmup_loss(decoder, codec, assistant, prompts, refs, cfg, gen)

    log = MetricsLog(work / "metrics.jsonl")
    stage.run_stage("assistant", cfg.stage, {"assistant": assistant}, list(assistant.parameters()), loss_fn, cfg,
                    work, log, place)
    metrics = {"stage": "assistant_sft", "init": str(init), "assistant_sft_s": round(time.time() - t0, 1)}
    return stage.finish_checkpoint_stage(out, decoder, tokenizer, codec, assistant.eval(), task=task,
                                   task_name=ck.config.task, cfg=cfg, command=command, commit=commit,
                                   metrics=metrics, log=log)


if __name__ == "__main__":
    exit_on_user_error(main)  # a failed run raises, and Python exits non-zero
