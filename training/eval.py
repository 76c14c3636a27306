"""pass@k curves on held-out questions, for one or more checkpoints.

    python -m training.eval --checkpoint DIR [--checkpoint DIR2 ...] --task countdown --problems 500 \
        --k 1,2,4,8,16,32,64 --out results/NAME

Writes NAME/results.json, NAME/table.md and NAME/passk.png. A latent checkpoint draws max(k) plans
with one text each (diversity comes from the plans); a token-level one draws max(k) texts.
Each checkpoint's finished evaluation is kept in NAME/parts/, so a rerun with the same flags on the
same checkpoint (an interrupted `make demo`) picks up where it stopped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from ladi_core import seeding
from ladi_core.backends import SamplingParams
from ladi_core.checkpoint import exit_on_user_error, read_config
from ladi_core.decoder import load_decoder
from ladi_core.flow import REPULSION_KERNELS
from ladi_core.generation import Reasoner, pad_embeds
from ladi_core.metrics import distinct_correct, maj_at_k, mean_pairwise_distance, pass_at_k
from ladi_core.seeding import question_seed
from ladi_core.tasks import Question, get_task
from ladi_core.verifiers import Verifier

from .common import Placement, set_threads, teacher_forcing


def evaluate(reasoner: Reasoner, questions: list[Question], verifier: Verifier, *, plans: int,
             samples_per_plan: int, params: SamplingParams, batch_questions: int = 32, progress: bool = True,
             desc: str = "eval", **plan_overrides) -> list[dict]:
    """One record per question: every sample's correctness and canonical answer, plus plan spread."""
    records = []
    bar = tqdm(total=len(questions), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(questions), batch_questions):
        chunk = questions[start:start + batch_questions]
        # question i of the evaluation is asked with question_seed(seed, i), as the API would be
        gens = reasoner.generate([q.prompt for q in chunk], plans, samples_per_plan,
                                 replace(params, seed=question_seed(params.seed, start)),
                                 **plan_overrides)
        for q, g in zip(chunk, gens):
            rewards = [verifier.score(c.text, q.reference) for c in g.completions]
            correct = [r.solved for r in rewards]
            answers = [r.answer for r in rewards]
            records.append({
                "id": q.id, "n": len(correct), "c": sum(correct), "correct": correct, "answers": answers,
                "format": statistics.fmean(r.format for r in rewards),
                "distinct_correct": distinct_correct(answers, correct),
                "plan_distance": mean_pairwise_distance(g.plans) if g.plans is not None and len(g.plans) > 1 else None,
                "tokens": statistics.fmean(len(c.decoded.token_ids) for c in g.completions),
                "votes": votes(answers, correct),
                "example": g.completions[0].text,
            })
        bar.update(len(chunk))
    bar.close()
    return records


def votes(answers: list[str | None], correct: list[bool]) -> list[list]:
    """[answer, count, correct] per distinct parsed answer, in first-seen order: what maj@k (ties to
    the first seen), distinct correct solutions and the answer spread are recomputed from in
    per_question.jsonl, at a fraction of the size of every sample's answer."""
    seen: dict[str, list] = {}
    for a, ok in zip(answers, correct):
        if a is not None:
            seen.setdefault(a, [a, 0, ok])[1] += 1
    return list(seen.values())


@torch.no_grad()
def reference_posteriors(reasoner: Reasoner, questions: list[Question]) -> tuple[list[int], list[str], torch.Tensor]:
    """The codec's posterior mean (normalised, the policy's space) of each question's first reference
    solution: (question indices, reference texts, plans [R, L, d_z]). Questions without one are skipped."""
    codec, tok = reasoner.checkpoint.codec, reasoner.tokenizer
    idx, refs, rows = [], [], []
    for i, q in enumerate(questions):
        ref = next((s for s in q.solutions if s), None) if q.solutions else None
        if ref is None:
            continue
        pid = reasoner.prompt_ids([q.prompt])[0]
        ids = pid + tok(ref, add_special_tokens=False).input_ids + [tok.eos_token_id]
        idx.append(i)
        refs.append(ref)
        rows.append(reasoner.prompt_embeds([ids])[0])
    if not rows:
        return [], [], torch.empty(0)
    x, mask = pad_embeds(rows)
    mu, _ = codec.encoder(x, mask)
    return idx, refs, codec.normalize(mu)


@torch.no_grad()
def plan_following(reasoner: Reasoner, questions: list[Question], plans: int = 8, max_tokens: int = 96) -> dict:
    """Does the decoder follow the latent plan? (A collapsed codec writes the same text for any plan.)

    - plan_texts: distinct greedy texts a question's `plans` prior plans decode to, on average
      (1.0 = the plan is ignored).
    - reconstruction: the fraction of reference reasonings the decoder writes back exactly, greedily,
      from their own posterior mean (a codec round trip).
    """
    if not reasoner.is_latent:
        raise ValueError("plan_following needs a latent checkpoint")
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=0)
    gens = reasoner.generate([q.prompt for q in questions], plans, 1, greedy)
    distinct = [len({c.text.strip() for c in g.completions}) for g in gens]
    idx, refs, post = reference_posteriors(reasoner, questions)
    hits = 0
    if idx:
        prompts = reasoner.prompt_embeds(reasoner.prompt_ids([questions[i].prompt for i in idx]))
        outs = reasoner.decode(prompts, post, 1, greedy)
        hits = sum(o[0].text.strip() == r.strip() for o, r in zip(outs, refs))
    return {"plan_texts": statistics.fmean(distinct), "reconstruction": hits / len(idx) if idx else None}


@torch.no_grad()
def latent_information(reasoner: Reasoner, questions: list[Question]) -> dict:
    """How much the decoder reads from z: the teacher-forced cross-entropy (nats per token) of each
    reference reasoning given its own posterior mean, against the same given another question's
    posterior (a shuffled pairing). Equal figures mean the plan is ignored; exact-match
    reconstruction is the stricter test a trained codec must pass, this one shows any use of z."""
    idx, refs, post = reference_posteriors(reasoner, questions)
    if len(idx) < 2:
        return {"ce_own_z": None, "ce_shuffled_z": None}
    tok, eos = reasoner.tokenizer, reasoner.tokenizer.eos_token_id
    prompts = reasoner.prompt_embeds(reasoner.prompt_ids([questions[i].prompt for i in idx]))
    targets = [tok(r, add_special_tokens=False).input_ids + [eos] for r in refs]
    decoder = getattr(reasoner.backend, "model", None)  # the transformers backend's own model
    if decoder is None:  # a vLLM engine keeps its weights in its own processes
        decoder, _ = load_decoder(reasoner.checkpoint.decoder_dir)
    out = {}
    for name, plans in (("own", post), ("shuffled", post.roll(1, 0))):
        x, mask, labels = teacher_forcing(reasoner.prefixes(prompts, plans), targets, reasoner.embed_tokens)
        logits = decoder(inputs_embeds=x.to(decoder.dtype), attention_mask=mask.long()).logits[:, :-1].float()
        total = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                                  reduction="sum")
        out[f"ce_{name}_z"] = float(total) / sum(len(t) for t in targets)
    return out


@torch.no_grad()
def plan_diagnostics(reasoner: Reasoner, questions: list[Question], verifier: Verifier, params: SamplingParams,
                     samples: int = 4) -> dict:
    """Where the latent path loses its accuracy: pass@1 decoding from three kinds of plan, each with
    `samples` texts per question at the evaluation's sampling settings.

    - ceiling@1: the codec's posterior of a reference solution (what a perfect prior would get);
    - prior@1: the prior's own plans (the headline pass@1, measured here the same way);
    - noise@1: plans of pure N(0, I) noise in the policy's normalised space (the floor).
    """
    if not reasoner.is_latent:
        raise ValueError("plan_diagnostics needs a latent checkpoint")
    cfg = reasoner.checkpoint.codec.cfg
    gen = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
    idx, _, post = reference_posteriors(reasoner, questions)
    qs = [questions[i] for i in idx]
    if not qs:
        return {"ceiling@1": None, "prior@1": None, "noise@1": None}
    prompts = reasoner.prompt_embeds(reasoner.prompt_ids([q.prompt for q in qs]))
    prior = reasoner.sample_plans(prompts, 1, generator=gen).latents
    noise = seeding.randn((len(qs), cfg.latent_tokens, cfg.latent_dim), gen, device=prior.device)
    out = {}
    for name, plans in (("ceiling", post), ("prior", prior), ("noise", noise)):
        texts = reasoner.decode(prompts, plans, samples, params)
        correct = [verifier.score(t.text, q.reference).solved for q, ts in zip(qs, texts) for t in ts]
        out[f"{name}@1"] = statistics.fmean(correct)
    out["diagnostic_questions"] = len(qs)
    return out


@torch.no_grad()
def thought_diagnostics(reasoner: Reasoner, questions: list[Question], verifier: Verifier, params: SamplingParams,
                        samples: int = 4) -> dict:
    """A recurrent checkpoint's floor: pass@1 decoding from its own thoughts (`prior@1`, the
    headline measured the same way) and from another question's thoughts (`noise@1`: the same
    kind of vector, carrying the wrong question). Equal figures would mean the thoughts are unread."""
    prompts = reasoner.prompt_embeds(reasoner.prompt_ids([q.prompt for q in questions]))
    own = reasoner.sample_plans(prompts, 1).latents
    out = {}
    for name, plans in (("prior", own), ("noise", own.roll(1, 0))):
        texts = reasoner.decode(prompts, plans, samples, params)
        correct = [verifier.score(t.text, q.reference).solved for q, ts in zip(questions, texts) for t in ts]
        out[f"{name}@1"] = statistics.fmean(correct)
    out["diagnostic_questions"] = len(questions)
    return out


def summarize(records: list[dict], ks: list[int]) -> dict:
    out = {"questions": len(records), "samples": records[0]["n"] if records else 0}
    for k in ks:
        out[f"pass@{k}"] = statistics.fmean(pass_at_k(r["n"], r["c"], k) for r in records)
    kmax = max(ks)
    out[f"maj@{kmax}"] = statistics.fmean(maj_at_k(r["answers"], r["correct"], kmax) for r in records)
    out["distinct_correct"] = statistics.fmean(r["distinct_correct"] for r in records)
    out["format"] = statistics.fmean(r["format"] for r in records)
    tokens = [r["tokens"] for r in records if "tokens" in r]  # absent from evaluations kept before it was
    out["tokens"] = statistics.fmean(tokens) if tokens else None
    dists = [r["plan_distance"] for r in records if r["plan_distance"] is not None]
    out["plan_distance"] = statistics.fmean(dists) if dists else None
    return out


def markdown_table(results: dict[str, dict], ks: list[int]) -> str:
    cols = ["questions", *(f"pass@{k}" for k in ks), f"maj@{max(ks)}", "distinct_correct", "plan_distance",
            "plan_texts", "reconstruction", "ceiling@1", "prior@1", "noise@1", "format", "tokens", "s_per_question",
            "wall_s"]
    lines = ["| checkpoint | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, s in results.items():
        cells = []
        for c in cols:
            v = s.get(c)
            pct = c.startswith(("pass", "maj", "format", "recon")) or c.endswith("@1")
            cells.append("-" if v is None else f"{100 * v:.1f}" if pct else f"{v:.3f}" if c == "s_per_question"
                         else f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\npass@k, maj@k and format in %; distinct_correct = distinct correct solutions per " \
        "question (up to commutativity/associativity); plan_distance = mean pairwise L2 distance of a question's " \
        "latent plans (normalised latent space); plan_texts = distinct greedy texts from 8 plans of one question " \
        "(1 = the decoder ignores the plan); questions = held-out questions the row was evaluated on (the " \
        "first N of the same list); reconstruction = % of reference reasonings decoded back exactly from " \
        "their own latent; ceiling@1 / prior@1 / noise@1 = pass@1 decoding from a reference solution's posterior " \
        "(what a perfect prior would get), from the prior's plans, and from pure-noise plans (the floor); for a " \
        "recurrent (Coconut) checkpoint prior@1 decodes from its own thoughts and noise@1 from another question's " \
        "thoughts; tokens = " \
        "tokens written per text; s_per_question = generation wall time per question (all max(k) texts, plans " \
        "included, diagnostics not).\n"


# a method's rows share a hue (token rows blue, the diffusion rows orange, ...); the alias joins
# rows named after the same method's stages (ladir-* are LaDi-RL's start, latent-rl is Coconut's)
_FAMILY_ALIAS = {"ladir": "ladi", "latent": "coconut"}
_FAMILY_MAPS = ["Blues", "Oranges", "Greens", "Purples", "Reds", "Greys", "YlOrBr", "BuGn"]
_LINE_STYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def family(name: str) -> str:
    """The method a row belongs to: its name up to the first '-', with the aliases above."""
    head = name.split("-")[0]
    return _FAMILY_ALIAS.get(head, head)


def line_styles(names: list[str]) -> dict[str, tuple[tuple, str, str]]:
    """(colour, line style, marker) per row, rows grouped by family (first-seen order): one hue and
    marker per family, a darker shade and the next line style per member, so that no two rows look
    alike and a family reads as one."""
    import matplotlib

    families = list(dict.fromkeys(family(n) for n in names))
    members = {f: [n for n in names if family(n) == f] for f in families}
    out = {}
    for i, f in enumerate(families):
        cmap = matplotlib.colormaps[_FAMILY_MAPS[i % len(_FAMILY_MAPS)]]
        rows = members[f]
        for j, n in enumerate(rows):
            shade = 0.45 + 0.5 * (j / max(1, len(rows) - 1)) if len(rows) > 1 else 0.75
            out[n] = (cmap(shade), _LINE_STYLES[j % len(_LINE_STYLES)], _MARKERS[i % len(_MARKERS)])
    return out


def plot(results: dict[str, dict], ks: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = line_styles(list(results))
    most = max((r.get("questions") or 0 for r in results.values()), default=0)
    for name, (colour, style, marker) in styles.items():
        n = results[name].get("questions")
        label = f"{name} ({n} questions)" if n and n < most else name
        ax.plot(ks, [100 * results[name][f"pass@{k}"] for k in ks], marker=marker, markersize=4, color=colour,
                linestyle=style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint directory (repeatable)")
    p.add_argument("--name", action="append", help="display name per checkpoint (default: directory name)")
    p.add_argument("--task", default="countdown")
    p.add_argument("--verifier", help="for JSONL tasks: math or code")
    p.add_argument("--problems", type=int, default=500)
    p.add_argument("--problems-for", action="append", default=[], metavar="NAME=N",
                   help="evaluate row NAME on the first N of the --problems questions only (an intermediate "
                   "row the comparison does not rest on; repeatable); the table's `questions` column says so")
    p.add_argument("--k", default="1,2,4,8,16,32,64")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--samples-per-plan", type=int, default=1, help="latent checkpoints: N texts per plan")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's)")
    p.add_argument("--guidance", type=float)
    p.add_argument("--diversity", type=float)
    p.add_argument("--repulsion", choices=REPULSION_KERNELS, help="the diversity guidance's kernel (flow.repulsion)")
    p.add_argument("--decoder-only", action="store_true",
                   help="decode from the prompt alone, no plan (a latent checkpoint's decoder as a token-level model)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-questions", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU when there is one)")
    p.add_argument("--probe-questions", type=int, default=64,
                   help="latent checkpoints: questions for the plan-following probe (plan_texts, "
                   "reconstruction); 0 skips it")
    p.add_argument("--diagnostic-questions", type=int, default=500,
                   help="latent checkpoints: questions for ceiling@1 / prior@1 / noise@1 (4 texts each); "
                   "0 skips them")
    return p.parse_args(argv)


def part_key(args: argparse.Namespace, ckpt: str, problems: int) -> str:
    """What a checkpoint's evaluation depends on: every flag that changes a figure, and the
    checkpoint itself (its ladi.json records how it was made, down to the commit and metrics)."""
    flags = {k: v for k, v in vars(args).items()
             if k not in ("checkpoint", "name", "out", "threads", "device", "problems_for")}
    made = (Path(ckpt) / "ladi.json").read_text()
    return hashlib.sha256(json.dumps([flags, made, problems], sort_keys=True).encode()).hexdigest()[:16]


def row_problems(args: argparse.Namespace, names: list[str]) -> dict[str, int]:
    """Questions per row: --problems, or fewer where --problems-for NAME=N says so."""
    rows = dict.fromkeys(names, args.problems)
    for spec in args.problems_for:
        name, sep, n = spec.partition("=")
        if not sep or not n.strip().isdigit() or int(n) < 1:
            raise SystemExit(f"--problems-for takes NAME=N with N >= 1, got {spec!r}")
        if name not in rows:
            raise SystemExit(f"--problems-for {spec!r}: no row named {name!r} (rows: {', '.join(names)})")
        if int(n) > args.problems:
            raise SystemExit(f"--problems-for {spec!r}: N is more than --problems ({args.problems})")
        rows[name] = int(n)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    device = Placement.resolve(args.device).device
    ks = sorted({int(k) for k in args.k.split(",")})
    if ks[0] < 1:
        raise SystemExit("--k values must be >= 1")
    names = args.name or [Path(c).name for c in args.checkpoint]
    if len(names) != len(args.checkpoint):
        raise SystemExit("give one --name per --checkpoint")
    row_n = row_problems(args, names)
    task = get_task(args.task, args.verifier)
    all_questions = task.questions("test", args.problems, seed=0)
    params = SamplingParams(args.temperature, args.top_p, args.max_tokens, args.seed)
    print(json.dumps({**vars(args), "k": ks}, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, per_question = {}, {}
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    for ckpt in args.checkpoint:
        read_config(ckpt)  # every path is a checkpoint, before the first one's minutes of work
    for name, ckpt in zip(names, args.checkpoint):
        questions = all_questions[:row_n[name]]
        part = parts / f"{name}-{part_key(args, ckpt, len(questions))}.json"
        if part.is_file():
            saved = json.loads(part.read_text())
            results[name], per_question[name] = saved["summary"], saved["records"]
            print(f"{name}: evaluated before with these flags ({part}), reused")
            continue
        t0 = time.time()
        reasoner = Reasoner.from_checkpoint(ckpt, device=str(device))
        if args.decoder_only:
            reasoner = reasoner.without_plans()
        n = max(ks)
        if reasoner.distinct_plans:
            spp = args.samples_per_plan
            if n % spp:
                raise SystemExit(f"max k ({n}) must be a multiple of --samples-per-plan ({spp})")
            plans = n // spp
        else:
            plans, spp = 1, n  # token-level, or a deterministic thinker: one plan (its thoughts), n texts
        t_gen = time.time()
        recs = evaluate(reasoner, questions, task.verifier, plans=plans, samples_per_plan=spp, params=params,
                        batch_questions=args.batch_questions, desc=name, steps=args.steps,
                        guidance=args.guidance, diversity=args.diversity, repulsion=args.repulsion)
        summary = summarize(recs, ks)
        summary["s_per_question"] = (time.time() - t_gen) / len(questions)
        if reasoner.is_latent and not reasoner.distinct_plans and args.diagnostic_questions > 0:
            summary.update(thought_diagnostics(reasoner, questions[:args.diagnostic_questions], task.verifier, params))
        if reasoner.is_latent and reasoner.checkpoint.codec.encoder is not None:  # a frame-only codec encodes nothing
            if args.probe_questions > 0:
                summary.update(plan_following(reasoner, questions[:args.probe_questions], max_tokens=args.max_tokens))
            if args.diagnostic_questions > 0:
                summary.update(plan_diagnostics(reasoner, questions[:args.diagnostic_questions], task.verifier,
                                                params))
        summary.update(wall_s=round(time.time() - t0, 1), kind=reasoner.checkpoint.config.kind,
                       plans=plans if reasoner.is_latent else None, samples_per_plan=spp, checkpoint=str(ckpt))
        results[name], per_question[name] = summary, recs
        part.write_text(json.dumps({"summary": summary, "records": recs}))
        print(f"{name}: " + ", ".join(f"pass@{k}={100 * summary[f'pass@{k}']:.1f}" for k in ks)
              + f", distinct={summary['distinct_correct']:.2f}, {summary['wall_s']}s")
    (out / "results.json").write_text(json.dumps({"args": {**vars(args), "k": ks}, "results": results}, indent=2))
    (out / "per_question.jsonl").write_text("".join(
        json.dumps({"checkpoint": name, **{k: v for k, v in r.items() if k not in ("correct", "answers")}}) + "\n"
        for name, recs in per_question.items() for r in recs))
    table = markdown_table(results, ks)
    (out / "table.md").write_text(f"# pass@k on {args.problems} held-out {args.task} questions\n\n" + table)
    plot(results, ks, out / "passk.png", f"{args.task}: {args.problems} held-out questions")
    print(table)
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
