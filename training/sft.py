"""Supervised stages: (1) decoder SFT on chain-of-thought text, (2) the latent codec, (3) the
diffusion prior. Writes the latent checkpoint to --out and the token-level one (stage 1 alone)
beside it at <out>-token; resumable state and a JSONL metrics log live in <out>.work/.

    python -m training.sft --task countdown --preset {smoke,demo} --out DIR [--seed S] [--resume]
    python -m training.sft --decoder-init MODEL_DIR --preset qwen2.5-1.5b --out DIR   (a real chat model, one GPU)

--device picks where it trains (auto: the GPU when there is one); --precision bf16 runs the forward
passes under autocast with float32 weights (the real-model preset's setting).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ladi_core.checkpoint import (
    command_line,
    exit_on_user_error,
    git_commit,
    load_checkpoint,
    make_provenance,
    save_checkpoint,
)
from ladi_core.codec import LatentCodec, build_inputs_embeds
from ladi_core.decoder import build_char_tokenizer, build_decoder, decoder_shape, load_decoder
from ladi_core.generation import pad_embeds
from ladi_core.policies import DiffusionPolicy
from ladi_core.tasks import get_task

from .common import MetricsLog, Placement, load_state, pad_batch, save_state, set_threads, step_rng
from .config import PRESETS, with_overrides
from .stage import Examples, add_placement_arguments, latent_reconstruction_loss, open_work_dir, quick_eval, run_stage


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.sft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="countdown", help="countdown, or a path to a .jsonl dataset")
    p.add_argument("--verifier", help="for JSONL tasks: math or code")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--out", required=True, help="latent checkpoint directory (token-level goes to <out>-token)")
    p.add_argument("--seed", type=int)
    p.add_argument("--decoder-init", help="local Hugging Face model directory to fine-tune instead of a tiny decoder")
    p.add_argument("--threads", type=int)
    add_placement_arguments(p)
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="cap each of the three stages at N steps (a quick check of a setup, e.g. a new model or GPU)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in <out>.work/")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    cfg = with_overrides(PRESETS[args.preset], task=args.task, verifier=args.verifier, seed=args.seed,
                         decoder_init=args.decoder_init, threads=args.threads, device=args.device,
                         precision=args.precision)
    if cfg.decoder_init:  # the decoder's own shape, and the codec and prior sized to it, before printing
        if not (Path(cfg.decoder_init) / "config.json").is_file():
            raise SystemExit(f"--decoder-init {cfg.decoder_init}: not a Hugging Face model directory (no config.json)")
        cfg = replace(cfg, decoder=decoder_shape(cfg.decoder_init))
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise SystemExit(f"--max-steps {args.max_steps}: give at least 1")
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), steps=min(getattr(cfg, name).steps, args.max_steps))
                              for name in ("decoder_stage", "codec_stage", "prior_stage")})
    hidden = cfg.decoder.hidden_size
    cfg = replace(cfg, codec=replace(cfg.codec, hidden_size=hidden), policy=replace(cfg.policy, hidden_size=hidden))
    set_threads(cfg.threads)
    place = Placement.resolve(cfg.device, cfg.precision)
    out = Path(args.out)
    token_out = out.with_name(out.name + "-token")
    work = open_work_dir(out, cfg.to_json(), args.resume)
    print(f"training.sft preset={args.preset} on {place}\n{cfg.to_json()}", flush=True)
    log = MetricsLog(work / "metrics.jsonl")
    t_start = time.time()
    commit = git_commit()
    command = command_line("training.sft", argv)

    task = get_task(cfg.task, cfg.verifier, **asdict(cfg.countdown)) if cfg.task == "countdown" \
        else get_task(cfg.task, cfg.verifier)
    if cfg.decoder_init:
        decoder, tokenizer = load_decoder(cfg.decoder_init, device=place.device)
    else:
        tokenizer = build_char_tokenizer()
        decoder = build_decoder(cfg.decoder, tokenizer, seed=cfg.seed).to(place.device)
    data = Examples(task, tokenizer)
    pad = tokenizer.pad_token_id
    embed = decoder.get_input_embeddings()
    timings = {}

    # --- stage 1: decoder SFT ---------------------------------------------------------------------
    def decoder_loss(rng, gen, progress):
        prompts, comps = data.batch(cfg.decoder_stage.batch_size, rng)
        ids, mask = pad_batch([p + c for p, c in zip(prompts, comps)], pad)
        labels = ids.masked_fill(~mask, -100)
        for i, p in enumerate(prompts):
            labels[i, : len(p)] = -100
        ids, mask, labels = (t.to(place.device) for t in (ids, mask, labels))
        return decoder(input_ids=ids, attention_mask=mask.long(), labels=labels).loss, {}

    t0 = time.time()
    run_stage("decoder", cfg.decoder_stage, {"decoder": decoder}, list(decoder.parameters()), decoder_loss,
              cfg, work, log, place)
    timings["decoder_s"] = round(time.time() - t0, 1)
    prov = make_provenance(command, cfg.seed, json.loads(cfg.to_json()), {"stage": "decoder-sft", **timings},
                           commit)
    save_checkpoint(token_out, decoder, tokenizer, prov, task=cfg.task)
    token_metrics = quick_eval(token_out, task, cfg, place.device)

    # --- stage 2: latent codec (decoder fine-tuned alongside) --------------------------------------
    codec = LatentCodec(cfg.codec).to(place.device)  # sized to the decoder above, before the config was printed
    policy = DiffusionPolicy(replace(cfg.policy, latent_tokens=cfg.codec.latent_tokens,
                                     latent_dim=cfg.codec.latent_dim), cfg.sampler).to(place.device)

    def encode_inputs(prompts, comps):
        ids, mask = pad_batch([p + c for p, c in zip(prompts, comps)], pad)
        ids, mask = ids.to(place.device), mask.to(place.device)
        with torch.no_grad():
            return embed(ids).detach(), mask

    def codec_loss(rng, gen, progress):
        prompts, comps = data.batch(cfg.codec_stage.batch_size, rng)
        return latent_reconstruction_loss(decoder, codec, prompts, comps, pad, gen, progress)

    t0 = time.time()
    run_stage("codec", cfg.codec_stage, {"decoder": decoder, "codec": codec},
              list(decoder.parameters()) + list(codec.parameters()), codec_loss, cfg, work, log, place)
    timings["codec_s"] = round(time.time() - t0, 1)

    # --- stage 3: diffusion prior over normalised latents --------------------------------------------
    decoder.eval()
    codec.eval()
    for prm in list(decoder.parameters()) + list(codec.parameters()):
        prm.requires_grad_(False)

    def latents_and_cond(prompts, comps):
        enc_in, enc_mask = encode_inputs(prompts, comps)
        with torch.no_grad():
            mu, _ = codec.encoder(enc_in, enc_mask)
            cond, cmask = pad_embeds(build_inputs_embeds(embed, prompts))
        return mu, cond, cmask

    stats_file = work / "latent_stats.pt"
    stats = load_state(stats_file)
    if stats is None:
        mus = []
        for j in range(0, cfg.stats_examples, 256):
            rng, _ = step_rng(cfg.seed, "stats", j)
            mus.append(latents_and_cond(*data.batch(min(256, cfg.stats_examples - j), rng))[0])
        mu = torch.cat(mus).flatten(0, 1)
        stats = {"mean": mu.mean(0), "std": mu.std(0).clamp_min(1e-3)}
        save_state(stats_file, **stats)
    codec.latent_mean.copy_(stats["mean"])
    codec.latent_std.copy_(stats["std"])

    def prior_loss(rng, gen, progress):
        mu, cond, cmask = latents_and_cond(*data.batch(cfg.prior_stage.batch_size, rng))
        return policy.flow_matching_loss(codec.normalize(mu), cond, cmask, gen), {}

    t0 = time.time()
    run_stage("prior", cfg.prior_stage, {"policy": policy}, list(policy.parameters()), prior_loss, cfg, work, log,
              place)
    timings["prior_s"] = round(time.time() - t0, 1)
    timings["total_s"] = round(time.time() - t_start, 1)
    prov = make_provenance(command, cfg.seed, json.loads(cfg.to_json()), {"stage": "latent-sft", **timings},
                           commit)
    save_checkpoint(out, decoder, tokenizer, prov, task=cfg.task, codec=codec, policy=policy)
    latent_metrics = quick_eval(out, task, cfg, place.device)
    load_checkpoint(out)  # the written directory must load cleanly
    summary = {"token": str(token_out), "latent": str(out), **timings,
               "token_pass@1": token_metrics["heldout_pass@1"], "latent_pass@1": latent_metrics["heldout_pass@1"]}
    log.write(stage="done", **summary)
    print(json.dumps(summary, indent=2))
    return out


if __name__ == "__main__":
    exit_on_user_error(main)  # a failed run raises, and Python exits non-zero
