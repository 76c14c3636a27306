"""Reinforcement learning on a LaDi checkpoint, one trainer, `--algo`: LaDi-RL (the diffusion plan
policy), DLR (an assistant's plans for a frozen decoder), the token-level GRPO baseline (the
decoder), and for a recurrent (Coconut) checkpoint GRPO after detached thoughts or latent RL
(a value head's score of the thoughts). Each method is a class in `training/algos/`.

    python -m training.rl --algo {ladi,dlr,grpo,coconut-grpo,latent-rl} --init DIR --out DIR2 \
        --task countdown --preset {smoke,demo}
    torchrun --nproc_per_node 2 -m training.rl ...        (data-parallel; gloo on CPU, nccl on GPU)

Each step draws `questions_per_step` training questions (split across ranks), rolls them out,
and takes `ppo_epochs` optimiser steps. Metrics go to <out>.work/metrics.jsonl (one line a step),
checkpoints to <out> every `save_every` steps and at the end (with the final evaluation in
ladi.json), resumable state to <out>.work/ (--resume).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ladi_core.backends import SamplingParams
from ladi_core.backends.vllm_options import add_option_arguments, options_from_arguments
from ladi_core.checkpoint import (
    command_line,
    exit_on_user_error,
    git_commit,
    make_provenance,
    save_checkpoint,
    update_metrics,
)
from ladi_core.cli import add_config_arguments, field_comments
from ladi_core.generation import Reasoner
from ladi_core.seeding import question_seed
from ladi_core.tasks import get_task

from .algos import ALGORITHMS
from .common import MetricsLog, Placement, hash_int, load_state, save_state, set_threads, step_rng
from .eval import evaluate, summarize
from .fsdp import ShardedState, clip_grad_norm, full_state_dict, is_sharded, shard_decoder
from .rewards import default_rewards
from .rl_config import PRESETS, SHARED_FIELDS, RLConfig, all_method_configs, build_config


class Dist:
    """torchrun's environment, or a single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        # NCCL reduces tensors on the rank's GPU, gloo on the CPU
        self.device = device if device.type == "cuda" else torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_grads(self, params) -> None:
        """Average gradients over ranks: every rank holds the same share, so this is the global mean.
        Sharded (FSDP) parameters are skipped: their reduce-scatter has averaged them already."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None and not is_sharded(p):
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))

    def gather(self, value: float) -> list[float]:
        """One number from every rank, in rank order (on every rank)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.world == 1:
            return t.tolist()
        out = [torch.zeros_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [float(x) for x in out]

    def checksum(self, params) -> list[float]:
        return self.gather(sum(float(p.detach().double().sum()) for p in params))

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def only_visible_gpu(index: int | None):
    """Processes started inside see only GPU `index` (as their cuda:0): a rank's rollout engine
    runs on that rank's GPU. None: nothing changes."""
    if index is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = before.split(",") if before else None
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def token_entropy(decoded) -> float:
    """Monte-Carlo estimate of the decoder's per-token entropy: mean -log p of the sampled tokens."""
    lps = [lp for row in decoded for d in row for lp in d.token_logprobs]
    return -statistics.fmean(lps) if lps else 0.0


def distinct_answers(answers: list[list[str | None]]) -> float:
    return statistics.fmean(len({a for a in row if a is not None}) for row in answers)


class Trainer:
    """The loop every algorithm shares: rollouts, optimiser steps, logging, checkpoints, resume,
    data parallelism and the final evaluation. What differs per method lives in `self.algo`."""

    def __init__(self, cfg: RLConfig, init: Path, out: Path, command: str, resume: bool):
        self.cfg, self.out, self.command = cfg, out, command
        self.place = Placement.resolve(cfg.device, cfg.precision)
        self.dist = Dist(self.place.device)
        if cfg.questions_per_step % self.dist.world:
            raise SystemExit(f"questions_per_step ({cfg.questions_per_step}) must divide by the "
                             f"{self.dist.world} processes")
        self.work = out.with_name(out.name + ".work")
        self.task = get_task(cfg.task, cfg.verifier)
        self.reasoner = Reasoner.from_checkpoint(init, device=str(self.place.device))
        self.decoder = self.reasoner.backend.trainable_decoder()
        self.algo = ALGORITHMS[cfg.algo](cfg, self.reasoner, self.decoder, self.task.verifier,
                                         default_rewards(cfg.format_weight))
        if cfg.fsdp:
            self._check_fsdp()
        # the decoder as a whole (what checkpoints save and the transformers rollouts decode with):
        # under FSDP a copy made before sharding, which takes the gathered weights after every step
        self.whole_decoder = copy.deepcopy(self.decoder) if cfg.fsdp else self.decoder
        self.rollout = self._rollout_reasoner()
        if cfg.fsdp:
            layers = shard_decoder(self.decoder, self.place.precision)
            if self.dist.main:
                print(f"--fsdp: {layers} decoder layers sharded over {self.dist.world} ranks; the whole weights are "
                      "gathered after every step for the rollouts and the checkpoints", flush=True)
        groups = self.algo.param_groups()
        self.params = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.99))
        self.sharded_state = ShardedState(self.algo.trainable_modules(), self.opt, self.work / "fsdp_state") \
            if cfg.fsdp else None
        self.start = 0
        self.commit = git_commit()
        if self.dist.main:
            if self.work.exists() and not resume:
                raise SystemExit(f"{self.work} exists from an earlier run: pass --resume, or remove it")
            self.work.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_state()
            self._push_decoder()
        self.log = MetricsLog(self.work / "metrics.jsonl", resume_at=self.start if resume else None) \
            if self.dist.main else None

    def _rollout_reasoner(self) -> Reasoner:
        """Who decodes the rollouts' texts: the trained decoder itself, or a vLLM engine on the same
        checkpoint that shares the live policy, codec and embeddings (and gets the decoder's weights
        after every step when the decoder trains)."""
        cfg = self.cfg
        ck = self.reasoner.checkpoint
        if cfg.rollout_backend == "transformers" and cfg.fsdp:
            from ladi_core.backends.transformers import TransformersBackend

            return Reasoner(ck, TransformersBackend(self.whole_decoder, ck.tokenizer))
        if cfg.rollout_backend == "transformers":
            return self.reasoner
        from ladi_core.backends.vllm import VLLMBackend

        if self.decoder.dtype != torch.float32 and cfg.vllm.dtype == "float32":
            raise SystemExit(f"the decoder trains in {self.decoder.dtype}; set --vllm-dtype to match")
        # one engine per rank (under torchrun), beside its trainer: on a GPU it runs on this rank's
        # device (its processes are started seeing only that one)
        gpu = self.place.device.index if self.place.device.type == "cuda" else None
        with only_visible_gpu(gpu):
            backend = VLLMBackend(ck.decoder_dir, ck.tokenizer, cfg.vllm)
        if self.algo.decoder_training and not backend.reloads_in_place and self.dist.main:
            print(f"{self.algo.decoder_training} trains the decoder, and this vLLM build cannot reload weights in "
                  "place (vLLM's CPU build repacks its linear layers at load): the rollout engine restarts on the "
                  "new weights after every step, which is slow; a GPU build reloads in place", flush=True)
        return Reasoner(ck, backend, embed_tokens=self.decoder.get_input_embeddings())

    def _check_fsdp(self) -> None:
        why = None
        if not self.algo.decoder_training:
            why = f"the decoder does not train in this run (--algo {self.cfg.algo}): there is nothing to shard"
        elif self.reasoner.checkpoint.policy is not None and self.reasoner.checkpoint.policy.needs_decoder:
            why = (f"--algo {self.cfg.algo}'s policy thinks with the decoder itself, and its thoughts would run "
                   "through the sharded layers during rollouts: not supported yet")
        if why:
            raise SystemExit(f"--fsdp: {why}")

    def _push_decoder(self) -> None:
        """The rollouts decode with the weights being trained (on-policy rollouts): under FSDP every
        rank gathers them (a collective) into its whole copy; a rank's vLLM engine takes them too."""
        if not self.algo.decoder_training:
            return
        state = full_state_dict(self.decoder) if self.cfg.fsdp else None
        if state is not None:
            self.whole_decoder.load_state_dict(state)
        if self.cfg.rollout_backend != "transformers":
            self.rollout.backend.update_weights(state if state is not None else self.decoder.state_dict())

    def close(self) -> None:
        if self.rollout is not self.reasoner and hasattr(self.rollout.backend, "close"):  # an engine to stop
            self.rollout.backend.close()

    # --- state ---------------------------------------------------------------------------------
    def _save_state(self, step: int) -> None:
        """Every rank calls it. FSDP: every rank writes its shards, then the step is written (so a
        step on disk always has its whole state); otherwise the main rank writes everything."""
        if self.sharded_state is not None:
            self.sharded_state.save()
            dist.barrier()
            if self.dist.main:
                save_state(self.work / "rl_state.pt", step=step, sharded=True)
            return
        if self.dist.main:
            save_state(self.work / "rl_state.pt", step=step, optimizer=self.opt.state_dict(),
                       modules={k: m.state_dict() for k, m in self.algo.trainable_modules().items()})

    def _load_state(self) -> None:
        state = load_state(self.work / "rl_state.pt")
        if state is not None and self.sharded_state is not None:
            if not state.get("sharded"):
                raise SystemExit(f"--resume --fsdp: {self.work} holds the state of a run without --fsdp")
            self.sharded_state.load()
            self.start = state["step"]
            if self.dist.main:
                print(f"resuming at step {self.start}", flush=True)
            return
        if state is None:
            raise SystemExit(f"--resume: no saved state in {self.work}")
        if state.get("sharded"):
            raise SystemExit(f"--resume: {self.work} holds the sharded state of an --fsdp run: resume it with --fsdp")
        for k, m in self.algo.trainable_modules().items():
            m.load_state_dict(state["modules"][k])
        self.opt.load_state_dict(state["optimizer"])
        self.start = state["step"]
        if self.dist.main:
            print(f"resuming at step {self.start}", flush=True)

    def _save_checkpoint(self, metrics: dict) -> None:
        ck = self.reasoner.checkpoint
        prov = make_provenance(self.command, self.cfg.seed, json.loads(self.cfg.to_json()),
                               {"algo": self.cfg.algo, "init": str(ck.path), **metrics}, self.commit)
        save_checkpoint(self.out, self.whole_decoder, self.reasoner.tokenizer, prov, task=ck.config.task,
                        **self.algo.checkpoint_parts())

    # --- one step ------------------------------------------------------------------------------
    def _questions(self, step: int):
        rng, gen = step_rng(self.cfg.seed, "rl", step)
        qs = self.task.questions("train", self.cfg.questions_per_step, seed=rng.randrange(2**31))
        # the step's questions are asked together with the step's seed: the one seeding rule
        seeds = [question_seed(hash_int(f"{self.cfg.seed}:rl:{step}"), i) for i in range(len(qs))]
        mine = slice(self.dist.rank, None, self.dist.world)
        rgen = torch.Generator().manual_seed(hash_int(f"{self.cfg.seed}:rl:{step}:rank{self.dist.rank}"))
        return qs[mine], seeds[mine], rgen

    def step(self, step: int) -> dict:
        cfg = self.cfg
        t0 = time.time()
        questions, seeds, gen = self._questions(step)
        self.algo.begin_step(step)
        with self.place.autocast():
            ro = self.algo.rollout(self.rollout, questions, seeds, gen, SamplingParams(cfg.temperature, 1.0,
                                                                                       cfg.max_new_tokens))
        t_roll = time.time() - t0
        stats: dict[str, float] = {}
        old: dict[str, torch.Tensor] = {}  # log-probs of the rollout policy, fixed at the first epoch
        for _ in range(cfg.ppo_epochs):
            self.opt.zero_grad(set_to_none=True)
            with self.place.autocast():
                loss, s = self.algo.loss(ro, old)
            loss.backward()
            self.dist.all_reduce_grads(self.params)
            if cfg.fsdp:
                clip_grad_norm(self.params, 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            stats = {**s, "policy_loss": loss.item()}
        self._push_decoder()
        scored = ro.scored
        rewards = scored.rewards
        texts = rewards.numel()
        metrics = {
            "reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
            **{f"reward_{k}": v for k, v in scored.components.items()},
            "zero_std_groups": (ro.group_values.std(-1, unbiased=False) == 0).float().mean().item(),
            "token_entropy": token_entropy(scored.decoded), "distinct_answers": distinct_answers(scored.answers),
            "plan_diversity": ro.plan_distance, "texts": texts * self.dist.world, **stats,
        }
        metrics = self.dist.mean(metrics)
        elapsed = time.time() - t0
        metrics.update(step=step, samples_per_s=round(texts * self.dist.world / elapsed, 2),
                       step_s=round(elapsed, 3), rollout_s=round(t_roll, 3))
        return metrics

    # --- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        bar = tqdm(range(self.start, cfg.steps), initial=self.start, total=cfg.steps, desc=f"rl[{cfg.algo}]",
                   disable=not self.dist.main)
        for step in bar:
            m = self.step(step)
            if self.dist.main:
                self.log.write(**{k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()})
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", loss=f"{m['policy_loss']:.4f}")
            if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1:
                self._save_state(step + 1)
                if self.dist.main:
                    self._save_checkpoint({"step": step + 1})
        # under FSDP the ranks hold different shards: compare the whole copies they decode with
        sums = self.dist.checksum(list(self.whole_decoder.parameters()) if cfg.fsdp else self.params)
        engines = self.dist.gather(self.engine_agreement()) if self._engine_follows() else None
        final = {}
        if self.dist.main:
            in_sync = max(sums) - min(sums) <= 1e-6 * max(1.0, abs(sums[0]))
            print(f"parameter checksums per rank: {sums} ({'ranks in sync' if in_sync else 'RANKS DIVERGED'})")
            extra = {}
            if engines is not None:
                ok = all(x == 1.0 for x in engines)
                print(f"greedy texts of each rank's rollout engine against the trained decoder: {engines} "
                      f"({'every engine has the trained weights' if ok else 'AN ENGINE IS BEHIND'})", flush=True)
                extra["rollout_engine_greedy_match"] = engines
            final = self.evaluate()
            update_metrics(self.out, {"final_eval": final, "steps": cfg.steps, **extra})
            self.log.write(stage="final", **final)
            print(json.dumps(final, indent=2))
        return final

    def _engine_follows(self) -> bool:
        """Whether a rollout engine holds its own copy of weights that training changes."""
        return self.cfg.rollout_backend != "transformers" and self.algo.decoder_training is not None

    def engine_agreement(self, prompts: int = 8) -> float:
        """The share of `prompts` held-out questions whose greedy text (the same seeded plan, for a
        latent checkpoint) is the same from this rank's rollout engine and from the trained decoder
        in torch: 1.0 when the pushed weights reached the engine."""
        from ladi_core.backends.transformers import TransformersBackend

        ck = self.reasoner.checkpoint
        trained = Reasoner(ck, TransformersBackend(self.whole_decoder, ck.tokenizer),
                           embed_tokens=self.whole_decoder.get_input_embeddings())
        qs = [q.prompt for q in self.task.questions("test", prompts, seed=1)]
        greedy = SamplingParams(0.0, 1.0, self.cfg.max_new_tokens, seed=self.cfg.seed)
        texts = [[g.completions[0].text for g in r.generate(qs, 1, 1, greedy)] for r in (self.rollout, trained)]
        return sum(a == b for a, b in zip(*texts)) / len(qs)

    def evaluate(self) -> dict:
        cfg = self.cfg
        qs = self.task.questions("test", cfg.eval_questions, seed=0)
        n = max(cfg.eval_k)
        plans = self.reasoner.distinct_plans  # else one prefix per question (no plan, or deterministic thoughts)
        recs = evaluate(self.rollout, qs, self.task.verifier, plans=n if plans else 1,
                        samples_per_plan=1 if plans else n,
                        params=SamplingParams(1.0, 1.0, cfg.max_new_tokens, seed=cfg.seed), progress=False)
        s = summarize(recs, list(cfg.eval_k))
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}


def parse_args(argv=None):
    """Flags for every RLConfig field and every method's own (`--help` lists them with their
    comments); a method's flag given with another --algo is refused by `build_config`."""
    p = argparse.ArgumentParser(prog="python -m training.rl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", choices=list(ALGORITHMS), required=True)
    p.add_argument("--init", required=True,
                   help="checkpoint to start from: latent (ladi), an assistant checkpoint (dlr), token-level (grpo), "
                   "a recurrent checkpoint (coconut-grpo, latent-rl)")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--resume", action="store_true")
    add_config_arguments(p, RLConfig, skip=("algo", "vllm", "method", "eval_k"))
    add_option_arguments(p, RLConfig().vllm)
    seen = set(SHARED_FIELDS)
    for cls in all_method_configs():
        users = [name for name, algo in ALGORITHMS.items() if issubclass(algo.Config, cls)]
        group = p.add_argument_group(f"--algo {' / '.join(users)}", description=" ".join(cls.__doc__.split()))
        also = {}  # a field two unrelated methods both have (LaDi's and DLR's clip) says so
        for name in set(cls.__dataclass_fields__) - seen:
            has = [a for a, algo in ALGORITHMS.items() if name in algo.Config.__dataclass_fields__]
            if set(has) - set(users):
                also[name] = f"{field_comments(cls).get(name, '')} [--algo {', '.join(has)}]".strip()
        add_config_arguments(group, cls, skip=tuple(seen), help=also)
        seen |= set(cls.__dataclass_fields__)
    return p.parse_args(argv)


RUN_FLAGS = ("algo", "init", "out", "preset", "resume")  # what the run is, not how it trains


def config_from_args(args: argparse.Namespace) -> RLConfig:
    """The preset, with the config fields given on the command line (and the --vllm-* options)."""
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in RUN_FLAGS and not k.startswith("vllm_")}
    try:
        return build_config(args.algo, {**PRESETS[args.preset], "vllm": options_from_arguments(args)}, given)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = config_from_args(args)
    set_threads(cfg.threads)
    out = Path(args.out)
    trainer = Trainer(cfg, Path(args.init), out, command_line("training.rl", argv), args.resume)
    if trainer.dist.main:
        saved = trainer.work / "config.json"
        if args.resume and saved.is_file() and json.loads(saved.read_text()) != json.loads(cfg.to_json()):
            raise SystemExit(f"--resume: the configuration differs from the run in {trainer.work}")
        saved.write_text(cfg.to_json())
        print(f"training.rl preset={args.preset} world={trainer.dist.world} on {trainer.place}\n{cfg.to_json()}",
              flush=True)
    try:
        return trainer.train()
    finally:
        trainer.close()
        trainer.dist.close()


if __name__ == "__main__":
    exit_on_user_error(main)
