"""What every supervised stage shares: the training examples, the resumable optimisation loop
(`run_stage`), the codec's reconstruction objective, the work directory, the flags and config of a
stage that turns one checkpoint into another, and the end of such a stage (save, held-out check,
clean reload). `training.sft`, the writer, the prior's rollout stage, DLR's warm-up and Coconut's
curriculum are each a `main` over these."""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from ladi_core import seeding
from ladi_core.backends import SamplingParams
from ladi_core.checkpoint import load_checkpoint, make_provenance, save_checkpoint, update_metrics
from ladi_core.codec import LatentCodec, with_plans
from ladi_core.decoder import chat_prompt
from ladi_core.generation import Reasoner

from .common import CPU, MetricsLog, Placement, load_state, lr_at, pad_batch, save_state, step_rng, teacher_forcing
from .config import SFTConfig, StageConfig, with_overrides
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
              loss_fn: Callable, cfg: SFTConfig, work: Path, log: MetricsLog, place: Placement = CPU) -> None:
    """AdamW loop with warm-up + cosine, tqdm, JSONL log and resumable state every cfg.save_every steps.
    The loss is computed under `place`'s autocast (its batches are the loss function's to place)."""
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
        with place.autocast():
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
    dev = embed.weight.device  # the batch is built and its noise drawn on the CPU, then moved
    ids, mask = pad_batch([p + c for p, c in zip(prompts, comps)], pad)
    if ccfg.token_substitution > 0:
        swap = (torch.rand(ids.shape, generator=gen) < ccfg.token_substitution) & mask
        ids = torch.where(swap, torch.randint(0, embed.num_embeddings, ids.shape, generator=gen), ids)
    ids, mask = ids.to(dev), mask.to(dev)
    with torch.no_grad():
        enc_in = embed(ids)
    z, kl = codec.encode(enc_in, mask, sample=True, generator=gen)
    z = z + ccfg.latent_noise * seeding.randn(z.shape, gen, device=dev)
    plan = codec.adapter(z)
    hidden_tok = embed(torch.tensor([pad], device=dev))[0]
    dropout = ccfg.cot_dropout if ccfg.decoder_sees_question else 0.0
    prefixes, reads = [], []
    for i, (p, c) in enumerate(zip(prompts, comps)):
        e = embed(torch.tensor(p + c, device=dev))
        hide = seeding.rand(len(c), gen, device=dev) < dropout
        reads.append(torch.where(hide[:, None], hidden_tok, e[len(p):]))
        prefixes.append(with_plans([e[: len(p)]], plan[i:i + 1], ccfg.decoder_sees_question)[0])
    x, xmask, lab = teacher_forcing(prefixes, comps, embed, target_embeds=reads)
    ce = decoder(inputs_embeds=x, attention_mask=xmask.long(), labels=lab).loss
    kl_nats = kl.sum(dim=(-2, -1)).mean()
    return ce + codec.kl_penalty(kl, progress), {"ce": round(ce.item(), 5), "kl": round(kl_nats.item(), 3)}


def quick_eval(path: Path, task, cfg: SFTConfig, device: torch.device | str = "cpu") -> dict:
    """A small held-out pass@1 check, recorded in the checkpoint's provenance."""
    reasoner = Reasoner.from_checkpoint(path, device=str(device))
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
    quick_eval(out, task, cfg, next(decoder.parameters()).device)
    load_checkpoint(out)  # the written directory must load cleanly
    log.write(**{**metrics, "stage": "done"})
    return out


def open_work_dir(out: Path, config_json: str, resume: bool) -> Path:
    """`<out>.work/`, the resumable state of a supervised run: refused when an earlier run left one
    and --resume was not passed, or when --resume comes with another configuration than that run's."""
    work = out.with_name(out.name + ".work")
    saved = work / "config.json"
    if work.exists() and not resume:
        raise SystemExit(f"{work} exists from an earlier run: pass --resume to continue it, or remove it")
    if resume and saved.is_file() and json.loads(saved.read_text()) != json.loads(config_json):
        raise SystemExit(f"--resume: the configuration differs from the run in {work}; use the same flags")
    work.mkdir(parents=True, exist_ok=True)
    saved.write_text(config_json)
    return work


def checkpoint_stage_parser(prog: str, doc: str, presets: dict, init_help: str) -> argparse.ArgumentParser:
    """The flags of a supervised stage that turns one checkpoint into another (the writer, the
    prior's rollout stage); `checkpoint_stage_config` applies them to the chosen preset."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help=init_help)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=sorted(presets), default="demo")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="override the preset's step count")
    p.add_argument("--threads", type=int)
    add_placement_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in <out>.work/")
    return p


def add_placement_arguments(p: argparse.ArgumentParser) -> None:
    """--device and --precision, for the stages whose configs have those fields."""
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (the GPU when there is one; the default)")
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="bf16: mixed precision (autocast forward passes, float32 weights); default fp32")


def checkpoint_stage_config(presets: dict, args: argparse.Namespace, **extra):
    """The preset with the stage's flags applied (unset flags leave the preset's values)."""
    cfg = with_overrides(presets[args.preset], seed=args.seed, threads=args.threads, device=args.device,
                         precision=args.precision, **extra)
    if args.steps is not None:
        cfg = replace(cfg, stage=replace(cfg.stage, steps=args.steps))
    return cfg
