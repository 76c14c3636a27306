"""Coconut's curriculum: a token-level CoT model learns to think in its own hidden states.

    python -m training.coconut_sft --init checkpoints/demo-token --out checkpoints/demo-coconut \
        [--preset demo] [--seed S] [--steps N] [--thoughts-per-step C] [--resume]

Stage k (1..max_stage): the first k reasoning lines of a countdown chain of thought (`a op b=c`,
one per line) become k x c continuous thoughts, and the decoder is trained by cross-entropy on the
language that remains (the later lines and `answer: ...`) after `[prompt; bot; thoughts; eot]`;
the prompt, bot, thoughts and eot carry no loss. The thoughts are computed with gradient (the
recurrent policy's `think`), so the loss trains them through the decoder. Every question at stage
k thinks k x c thoughts, a chain with fewer lines included (Coconut's pad-to-max option), so that
inference's fixed count is the last stage's. The optimiser is reset between stages (each stage is
its own resumable run). bot and eot are the frame-only codec's two learned vectors.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ladi_core.checkpoint import command_line, exit_on_user_error, git_commit, load_checkpoint
from ladi_core.codec import CodecConfig, LatentCodec, build_inputs_embeds
from ladi_core.decoder import chat_prompt, load_decoder
from ladi_core.generation import pad_embeds
from ladi_core.policies import RecurrentPolicy, RecurrentPolicyConfig
from ladi_core.tasks import get_task

from .common import MetricsLog, Placement, set_threads, teacher_forcing
from .config import CheckpointStageConfig, StageConfig
from .stage import checkpoint_stage_config, checkpoint_stage_parser, finish_checkpoint_stage, open_work_dir, run_stage


@dataclass(frozen=True)
class CoconutSFTConfig(CheckpointStageConfig):
    stage: StageConfig = StageConfig(500, 32, 3e-4, warmup=20)  # each curriculum stage
    thoughts_per_step: int = 1  # c (Coconut's GSM8K setting is 2)
    max_stage: int = 3  # the demo task's chains have at most 3 lines (4 numbers)


PRESETS: dict[str, CoconutSFTConfig] = {
    "demo": CoconutSFTConfig(),
    "smoke": CoconutSFTConfig(stage=StageConfig(6, 8, 3e-4, warmup=2), max_stage=2, save_every=3,
                              eval_questions=8, eval_samples=2, max_new_tokens=48),
}


def stage_example(completion: str, k: int, c: int) -> tuple[int, str]:
    """(thoughts, remaining language) for a chain of thought at curriculum stage k: its first k
    reasoning lines (those before `answer:`) are dropped for k x c thoughts."""
    lines = completion.split("\n")
    steps = next((i for i, line in enumerate(lines) if line.startswith("answer:")), len(lines))
    return k * c, "\n".join(lines[min(k, steps):])


def stage_loss(decoder, codec: LatentCodec, policy: RecurrentPolicy, prompts: list[list[int]],
               rests: list[list[int]], thoughts: int) -> torch.Tensor:
    """Cross-entropy of the remaining language (`rests`, with its end token) after
    `[prompt; bot; thoughts; eot]`, the thoughts computed with gradient."""
    embed = decoder.get_input_embeddings()
    prompt_embeds = build_inputs_embeds(embed, prompts)
    cond, mask = pad_embeds(prompt_embeds)
    h = policy.think(cond, mask, thoughts)
    prefixes = codec.prefixes(prompt_embeds, h)
    x, xmask, labels = teacher_forcing(prefixes, rests, embed)
    return decoder(inputs_embeds=x, attention_mask=xmask.long(), labels=labels).loss


def parse_args(argv=None):
    p = checkpoint_stage_parser("python -m training.coconut_sft", __doc__, PRESETS,
                                "a token-level CoT checkpoint (e.g. checkpoints/demo-token)")
    p.add_argument("--thoughts-per-step", type=int, help="c: continuous thoughts per replaced reasoning line")
    p.add_argument("--max-stage", type=int, help="the last curriculum stage (reasoning lines replaced)")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    cfg = checkpoint_stage_config(PRESETS, args, thoughts_per_step=args.thoughts_per_step, max_stage=args.max_stage)
    if cfg.thoughts_per_step < 1 or cfg.max_stage < 1:
        raise SystemExit("--thoughts-per-step and --max-stage must be at least 1")
    set_threads(cfg.threads)
    place = Placement.resolve(cfg.device, cfg.precision)
    init, out = Path(args.init), Path(args.out)
    ck = load_checkpoint(init, str(place.device))
    if ck.is_latent:
        raise SystemExit(f"{init} is a latent checkpoint: the curriculum starts from a token-level chain-of-thought "
                         "model (its -token twin)")
    work = open_work_dir(out, cfg.to_json(), args.resume)
    print(f"training.coconut_sft preset={args.preset} init={init} on {place}\n{cfg.to_json()}", flush=True)
    command, commit, t0 = command_line("training.coconut_sft", argv), git_commit(), time.time()

    task = get_task(cfg.task)
    decoder, tokenizer = load_decoder(ck.decoder_dir, device=place.device)
    hidden, n = decoder.config.hidden_size, cfg.max_stage * cfg.thoughts_per_step
    torch.manual_seed(cfg.seed)  # bot, eot and the (unused until latent RL) value head
    codec = LatentCodec(CodecConfig(latent_tokens=n, latent_dim=hidden, hidden_size=hidden, frame_only=True))
    policy = RecurrentPolicy(RecurrentPolicyConfig(latent_tokens=n, latent_dim=hidden, hidden_size=hidden,
                                                   thoughts_per_step=cfg.thoughts_per_step))
    codec, policy = codec.to(place.device), policy.to(place.device)
    policy.bind(decoder, codec)
    eos = tokenizer.eos_token_id
    log = MetricsLog(work / "metrics.jsonl")
    timings = {}
    for k in range(1, cfg.max_stage + 1):
        def loss_fn(rng, gen, progress, k=k):
            qs = task.questions("train", cfg.stage.batch_size, seed=rng.randrange(2**31))
            prompts = tokenizer([chat_prompt(tokenizer, q.prompt) for q in qs], add_special_tokens=False).input_ids
            cut = [stage_example(rng.choice(list(q.solutions)), k, cfg.thoughts_per_step) for q in qs]
            rests = [ids + [eos] for ids in tokenizer([r for _, r in cut], add_special_tokens=False).input_ids]
            ce = stage_loss(decoder, codec, policy, prompts, rests, cut[0][0])
            return ce, {"ce": round(ce.item(), 5), "thoughts": cut[0][0]}

        ts = time.time()
        run_stage(f"stage{k}", cfg.stage, {"decoder": decoder, "codec": codec},
                  list(decoder.parameters()) + list(codec.parameters()), loss_fn, cfg, work, log, place)
        timings[f"stage{k}_s"] = round(time.time() - ts, 1)
    metrics = {"stage": "coconut_sft", "init": str(init), **timings, "coconut_sft_s": round(time.time() - t0, 1)}
    decoder.eval()
    return finish_checkpoint_stage(out, decoder, tokenizer, codec, policy.eval(), task=task, task_name=ck.config.task,
                                   cfg=cfg, command=command, commit=commit, metrics=metrics, log=log)


if __name__ == "__main__":
    exit_on_user_error(main)  # a failed run raises, and Python exits non-zero
