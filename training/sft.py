"""Supervised stages: (1) decoder SFT on chain-of-thought text, (2) the latent codec, (3) the
diffusion prior. Writes the latent checkpoint to --out and the token-level one (stage 1 alone)
beside it at <out>-token; resumable state and a JSONL metrics log live in <out>.work/.

    python -m training.sft --task countdown --preset {smoke,demo} --out DIR [--seed S] [--resume]
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ladi_core.backends import SamplingParams
from ladi_core.checkpoint import (
    command_line,
    exit_on_user_error,
    git_commit,
    load_checkpoint,
    make_provenance,
    save_checkpoint,
    update_metrics,
)
from ladi_core.codec import LatentCodec, with_plans
from ladi_core.decoder import build_char_tokenizer, build_decoder, chat_prompt, load_decoder
from ladi_core.generation import Reasoner, pad_embeds
from ladi_core.policies import DiffusionPolicy
from ladi_core.tasks import get_task

from .common import (
    MetricsLog,
    load_state,
    lr_at,
    open_work_dir,
    pad_batch,
    save_state,
    set_threads,
    step_rng,
    teacher_forcing,
)
from .config import PRESETS, SFTConfig, StageConfig, with_overrides
from .eval import evaluate, plan_following, summarize


class Examples:
    """Tokenised (prompt, completion) pairs drawn from the task's training split."""

    def __init__(self, task, tokenizer):
        self.task, self.tok = task, tokenizer
        self.eos = tokenizer.eos_token_id

    def batch(self, n: int, rng) -> tuple[list[list[int]], list[list[int]]]:
        prompts, refs = self.batch_with_references(n, rng, 1)
        return prompts, [rs[0] for rs in refs]

    def batch_with_references(self, n: int, rng, k: int) -> tuple[list[list[int]], list[list[list[int]]]]:
        """`batch`, with k reference completions per question: distinct solutions while the
        question has them, then repeats (a repeat changes no minimum over references). With k=1
        it draws exactly what one random solution per question would (`rng.sample(s, 1)` is
        `rng.choice(s)`)."""
        qs = self.task.questions("train", n, seed=rng.randrange(2**31))
        prompts = self.tok([chat_prompt(self.tok, q.prompt) for q in qs], add_special_tokens=False).input_ids
        refs = []
        for q in qs:
            sols = rng.sample(list(q.solutions), min(k, len(q.solutions)))
            sols += [self.task.sample_solution(q, rng) for _ in range(k - len(sols))]
            refs.append([c + [self.eos] for c in self.tok(sols, add_special_tokens=False).input_ids])
        return prompts, refs


def run_stage(name: str, sc: StageConfig, modules: dict[str, torch.nn.Module], params: list,
              loss_fn: Callable, cfg: SFTConfig, work: Path, log: MetricsLog) -> None:
    """AdamW loop with warm-up + cosine, tqdm, JSONL log and resumable state every cfg.save_every steps."""
    opt = torch.optim.AdamW(params, lr=sc.lr, weight_decay=sc.weight_decay, betas=(0.9, 0.95))
    state_file = work / f"{name}.pt"
    start = 0
    state = load_state(state_file)
    if state is not None:
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        if state.get("done"):
            print(f"[{name}] already complete ({start} steps), skipping")
            return
        print(f"[{name}] resuming at step {start}")
    for m in modules.values():
        m.train()
    bar = tqdm(range(start, sc.steps), desc=name, initial=start, total=sc.steps)
    t_last = time.time()
    for step in bar:
        lr = lr_at(step, sc.steps, sc.lr, sc.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        rng, gen = step_rng(cfg.seed, name, step)
        loss, extra = loss_fn(rng, gen, step / sc.steps)
        if not torch.isfinite(loss):
            raise RuntimeError(f"[{name}] the loss is {loss.item()} at step {step}: the run failed (its state up to "
                               f"the last save is in {work}; lower the stage's lr and --resume)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 10 == 0 or step == sc.steps - 1:
            now = time.time()
            log.write(stage=name, step=step, loss=round(loss.item(), 5), lr=lr, grad_norm=round(float(gnorm), 4),
                      step_s=round((now - t_last) / (10 if step else 1), 4), **extra)
            t_last = now
        done = step == sc.steps - 1
        if done or (step + 1) % cfg.save_every == 0:
            save_state(state_file, step=step + 1, done=done, optimizer=opt.state_dict(),
                       modules={k: m.state_dict() for k, m in modules.items()})
    for m in modules.values():
        m.eval()


def latent_reconstruction_loss(decoder, codec: LatentCodec, prompts: list[list[int]], comps: list[list[int]],
                               pad: int, gen: torch.Generator, progress: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The codec objective: encode question + reasoning into z, then make the decoder write the
    reasoning from the prefix every decode uses (`with_plans`): `[prompt; bot; adapter(z); eot]`,
    or `[bot; adapter(z); eot]` alone for a question-free codec (LaDiR's). A decoder that sees the
    question gets a fraction of the reasoning tokens hidden from its input (`cot_dropout`, replaced
    by the pad embedding), so that it has to read them from z. `token_substitution` replaces a share
    of the encoder's input tokens at random (LaDiR: a decoder robust to imperfect latents)."""
    ccfg = codec.cfg
    embed = decoder.get_input_embeddings()
    ids, mask = pad_batch([p + c for p, c in zip(prompts, comps)], pad)
    if ccfg.token_substitution > 0:
        swap = (torch.rand(ids.shape, generator=gen) < ccfg.token_substitution) & mask
        ids = torch.where(swap, torch.randint(0, embed.num_embeddings, ids.shape, generator=gen), ids)
    with torch.no_grad():
        enc_in = embed(ids)
    z, kl = codec.encode(enc_in, mask, sample=True, generator=gen)
    z = z + ccfg.latent_noise * torch.randn(z.shape, generator=gen)
    plan = codec.adapter(z)
    hidden_tok = embed(torch.tensor([pad]))[0]
    dropout = ccfg.cot_dropout if ccfg.decoder_sees_question else 0.0
    prefixes, reads = [], []
    for i, (p, c) in enumerate(zip(prompts, comps)):
        e = embed(torch.tensor(p + c))
        hide = torch.rand(len(c), generator=gen) < dropout
        reads.append(torch.where(hide[:, None], hidden_tok, e[len(p):]))
        prefixes.append(with_plans([e[: len(p)]], plan[i:i + 1], ccfg.decoder_sees_question)[0])
    x, xmask, lab = teacher_forcing(prefixes, comps, embed, target_embeds=reads)
    ce = decoder(inputs_embeds=x, attention_mask=xmask.long(), labels=lab).loss
    kl_nats = kl.sum(dim=(-2, -1)).mean()
    return ce + codec.kl_penalty(kl, progress), {"ce": round(ce.item(), 5), "kl": round(kl_nats.item(), 3)}


def quick_eval(path: Path, task, cfg: SFTConfig) -> dict:
    """A small held-out pass@1 check, recorded in the checkpoint's provenance."""
    reasoner = Reasoner.from_checkpoint(path)
    qs = task.questions("test", cfg.eval_questions, seed=0)
    plans, spp = (cfg.eval_samples, 1) if reasoner.distinct_plans else (1, cfg.eval_samples)
    recs = evaluate(reasoner, qs, task.verifier, plans=plans, samples_per_plan=spp,
                    params=SamplingParams(1.0, 1.0, cfg.max_new_tokens, seed=cfg.seed), progress=False)
    s = summarize(recs, [1])
    metrics = {"heldout_questions": len(qs), "heldout_pass@1": round(s["pass@1"], 4),
               "heldout_format": round(s["format"], 4)}
    if reasoner.is_latent and reasoner.checkpoint.codec.encoder is not None:
        follow = plan_following(reasoner, qs[:32], max_tokens=cfg.max_new_tokens)
        metrics.update({f"heldout_{k}": round(v, 4) for k, v in follow.items() if v is not None})
    update_metrics(path, metrics)
    print(f"[eval] {path}: {metrics}")
    return metrics


def finish_checkpoint_stage(out: Path, decoder, tokenizer, codec, policy, *, task, task_name: str | None,
                            cfg, command: str, commit: str | None, metrics: dict, log: MetricsLog) -> Path:
    """The end of a stage that turns one latent checkpoint into another (the writer, the prior's
    rollout stage): the checkpoint with its provenance, the held-out check, a clean reload."""
    prov = make_provenance(command, cfg.seed, json.loads(cfg.to_json()), metrics, commit)
    save_checkpoint(out, decoder, tokenizer, prov, task=task_name, codec=codec, policy=policy)
    quick_eval(out, task, cfg)
    load_checkpoint(out)  # the written directory must load cleanly
    log.write(**{**metrics, "stage": "done"})
    return out


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
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in <out>.work/")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    cfg = with_overrides(PRESETS[args.preset], task=args.task, verifier=args.verifier, seed=args.seed,
                         decoder_init=args.decoder_init, threads=args.threads)
    set_threads(cfg.threads)
    out = Path(args.out)
    token_out = out.with_name(out.name + "-token")
    work = open_work_dir(out, cfg.to_json(), args.resume)
    print(f"training.sft preset={args.preset}\n{cfg.to_json()}", flush=True)
    log = MetricsLog(work / "metrics.jsonl")
    t_start = time.time()
    commit = git_commit()
    command = command_line("training.sft", argv)

    task = get_task(cfg.task, cfg.verifier, **asdict(cfg.countdown)) if cfg.task == "countdown" \
        else get_task(cfg.task, cfg.verifier)
    if cfg.decoder_init:
        decoder, tokenizer = load_decoder(cfg.decoder_init)
    else:
        tokenizer = build_char_tokenizer()
        decoder = build_decoder(cfg.decoder, tokenizer, seed=cfg.seed)
    hidden = decoder.config.hidden_size
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
        return decoder(input_ids=ids, attention_mask=mask.long(), labels=labels).loss, {}

    t0 = time.time()
    run_stage("decoder", cfg.decoder_stage, {"decoder": decoder}, list(decoder.parameters()), decoder_loss,
              cfg, work, log)
    timings["decoder_s"] = round(time.time() - t0, 1)
    prov = make_provenance(command, cfg.seed, json.loads(cfg.to_json()), {"stage": "decoder-sft", **timings},
                           commit)
    save_checkpoint(token_out, decoder, tokenizer, prov, task=cfg.task)
    token_metrics = quick_eval(token_out, task, cfg)

    # --- stage 2: latent codec (decoder fine-tuned alongside) --------------------------------------
    codec = LatentCodec(replace(cfg.codec, hidden_size=hidden))
    policy = DiffusionPolicy(replace(cfg.policy, hidden_size=hidden, latent_tokens=cfg.codec.latent_tokens,
                                     latent_dim=cfg.codec.latent_dim), cfg.sampler)

    def encode_inputs(prompts, comps):
        ids, mask = pad_batch([p + c for p, c in zip(prompts, comps)], pad)
        with torch.no_grad():
            return embed(ids).detach(), mask

    def codec_loss(rng, gen, progress):
        prompts, comps = data.batch(cfg.codec_stage.batch_size, rng)
        return latent_reconstruction_loss(decoder, codec, prompts, comps, pad, gen, progress)

    t0 = time.time()
    run_stage("codec", cfg.codec_stage, {"decoder": decoder, "codec": codec},
              list(decoder.parameters()) + list(codec.parameters()), codec_loss, cfg, work, log)
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
            cond, cmask = pad_embeds([embed(torch.tensor(p)) for p in prompts])
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
    run_stage("prior", cfg.prior_stage, {"policy": policy}, list(policy.parameters()), prior_loss, cfg, work, log)
    timings["prior_s"] = round(time.time() - t0, 1)
    timings["total_s"] = round(time.time() - t_start, 1)
    prov = make_provenance(command, cfg.seed, json.loads(cfg.to_json()), {"stage": "latent-sft", **timings},
                           commit)
    save_checkpoint(out, decoder, tokenizer, prov, task=cfg.task, codec=codec, policy=policy)
    latent_metrics = quick_eval(out, task, cfg)
    load_checkpoint(out)  # the written directory must load cleanly
    summary = {"token": str(token_out), "latent": str(out), **timings,
               "token_pass@1": token_metrics["heldout_pass@1"], "latent_pass@1": latent_metrics["heldout_pass@1"]}
    log.write(stage="done", **summary)
    print(json.dumps(summary, indent=2))
    return out


if __name__ == "__main__":
    exit_on_user_error(main)  # a failed run raises, and Python exits non-zero
