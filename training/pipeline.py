"""`make demo`: the whole comparison in one resumable command.

    python -m training.pipeline [--state .demo] [--python PY] [--dry-run]

Stages, each a command of this project run as a subprocess (so each is exactly what a researcher
would type, and each checkpoint's provenance records that command):

1. sft      token SFT (-> checkpoints/demo-token), then LaDiR's question-free codec and the prior
            (-> checkpoints/demo)
2. writer   the decoder learns to write from the question and the plan, codec and prior frozen
            (-> checkpoints/demo-ladir)
3. prior-rollout  LaDiR's stage 2: the prior learns from the writer's answer loss through its own
            sampled plans (-> checkpoints/demo-ladir-s2, the latent SFT model)
4. grpo     token-level GRPO from the token SFT checkpoint (-> checkpoints/demo-grpo)
5. ladi-rl  LaDi-RL (plan policy + text policy) from the latent SFT checkpoint, the same rollout
            budget (-> checkpoints/demo-ladi-rl)
6. dlr-sft  DLR's warm-up: an assistant policy learns to propose plans for the writer's frozen
            decoder and codec (-> checkpoints/demo-dlr-sft)
7. dlr      DLR's RL from it, the same rollout budget, decoder frozen (-> checkpoints/demo-dlr)
8. coconut-sft  Coconut's curriculum from the token SFT model: reasoning lines become continuous
            thoughts (-> checkpoints/demo-coconut)
9. coconut-grpo GRPO on the language after detached thoughts, the same budget (-> checkpoints/demo-coconut-grpo)
10. latent-rl   latent RL: a co-trained value head's score of the thoughts (-> checkpoints/demo-latent-rl)
11. compare all eleven on the same 500 held-out questions (-> results/rl-demo), then the RL curves

Resuming: a finished stage leaves `<state>/<stage>.done` (its command, wall time and when it
finished) and is skipped, unless its command has changed since or a stage it reads (`Stage.needs`)
finished after it; a stage that was started but not finished is continued with `--resume` (the evaluation
keeps each finished checkpoint in results/rl-demo/parts/). A stage never resumes work it did not
start itself: stale `.work/` directories from other runs are removed first. Wall times land in
results/rl-demo/pipeline.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

K = "1,2,4,8,16,32,64"
HEARTBEAT_S = 30  # how often a running stage's time so far is written down


@dataclass(frozen=True)
class Stage:
    name: str
    command: list[str]  # after the interpreter
    work: str | None = None  # the resumable state directory the command keeps (it takes --resume)
    after: list[list[str]] = field(default_factory=list)  # follow-up commands, cheap and idempotent
    needs: tuple[str, ...] = ()  # earlier stages whose checkpoints this one reads
    family: str = "core"  # core: the paper's comparison, always run; others only when asked for

    @property
    def out(self) -> str | None:
        """The checkpoint this stage writes (its --out), if any."""
        return self.command[self.command.index("--out") + 1] if "--out" in self.command else None


# Families beyond the core comparison (token SFT/GRPO against LaDiR and LaDi-RL): retrained only
# when named (`--with dlr`, `--all`); otherwise their rows are evaluated from the shipped checkpoints.
FAMILIES = ("dlr", "coconut")
# Intermediate rows the targets do not rest on: evaluated on the first 100 of the 500 questions.
INTERMEDIATE_ROWS = ("ladir-codec", "ladir-writer")
# RL runs drawn in curves.png: each RL stage keeps a copy of its metrics log beside the table, so the
# curves of a family that was not retrained come from the committed copy.
CURVES = {"token-grpo": "checkpoints/demo-grpo", "ladi-rl": "checkpoints/demo-ladi-rl", "dlr": "checkpoints/demo-dlr",
          "coconut-grpo": "checkpoints/demo-coconut-grpo", "latent-rl": "checkpoints/demo-latent-rl"}


def keep_metrics(run: str) -> list[str]:
    """A follow-up command: copy an RL run's metrics log to results/rl-demo/<run>-metrics.jsonl."""
    return ["-c", "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])",
            f"{CURVES[run]}.work/metrics.jsonl", f"results/rl-demo/{run}-metrics.jsonl"]


STAGES = [
    Stage("sft", ["-m", "training.sft", "--task", "countdown", "--preset", "demo", "--out", "checkpoints/demo",
                  "--seed", "0"], work="checkpoints/demo.work"),
    Stage("writer", ["-m", "training.writer", "--init", "checkpoints/demo", "--out", "checkpoints/demo-ladir",
                     "--decoder-from", "checkpoints/demo-token", "--preset", "demo", "--seed", "0"],
          work="checkpoints/demo-ladir.work", needs=("sft",)),
    Stage("prior-rollout", ["-m", "training.prior_rollout", "--init", "checkpoints/demo-ladir",
                            "--out", "checkpoints/demo-ladir-s2", "--preset", "demo", "--seed", "0"],
          work="checkpoints/demo-ladir-s2.work", needs=("writer",)),
    Stage("grpo", ["-m", "training.rl", "--algo", "grpo", "--init", "checkpoints/demo-token",
                   "--out", "checkpoints/demo-grpo", "--task", "countdown", "--preset", "demo", "--seed", "0"],
          work="checkpoints/demo-grpo.work", after=[keep_metrics("token-grpo")], needs=("sft",)),
    Stage("ladi-rl", ["-m", "training.rl", "--algo", "ladi", "--init", "checkpoints/demo-ladir-s2",
                      "--out", "checkpoints/demo-ladi-rl", "--lr", "2e-4", "--text-policy-coef", "1",
                      "--text-lr", "2e-5", "--task", "countdown", "--preset", "demo", "--seed", "0"],
          work="checkpoints/demo-ladi-rl.work", after=[keep_metrics("ladi-rl")], needs=("prior-rollout",)),
    Stage("dlr-sft", ["-m", "training.assistant_sft", "--init", "checkpoints/demo-ladir",
                      "--out", "checkpoints/demo-dlr-sft", "--preset", "demo", "--seed", "0"],
          work="checkpoints/demo-dlr-sft.work", needs=("writer",), family="dlr"),
    Stage("dlr", ["-m", "training.rl", "--algo", "dlr", "--init", "checkpoints/demo-dlr-sft",
                  "--out", "checkpoints/demo-dlr", "--lr", "3e-4", "--contrastive-weight", "0.01",
                  "--format-weight", "0.1", "--kl-beta", "0.02",
                  "--rollout-backend", "vllm", "--task", "countdown", "--preset", "demo", "--seed", "0"],
          work="checkpoints/demo-dlr.work", after=[keep_metrics("dlr")], needs=("dlr-sft",), family="dlr"),
    Stage("coconut-sft", ["-m", "training.coconut_sft", "--init", "checkpoints/demo-token",
                          "--out", "checkpoints/demo-coconut", "--preset", "demo", "--seed", "0"],
          work="checkpoints/demo-coconut.work", needs=("sft",), family="coconut"),
    Stage("coconut-grpo", ["-m", "training.rl", "--algo", "coconut-grpo", "--init", "checkpoints/demo-coconut",
                           "--out", "checkpoints/demo-coconut-grpo", "--format-weight", "0.1",
                           "--task", "countdown", "--preset", "demo", "--seed", "0"],
          work="checkpoints/demo-coconut-grpo.work", after=[keep_metrics("coconut-grpo")], needs=("coconut-sft",),
          family="coconut"),
    Stage("latent-rl", ["-m", "training.rl", "--algo", "latent-rl", "--init", "checkpoints/demo-coconut",
                        "--out", "checkpoints/demo-latent-rl", "--format-weight", "0.1",
                        "--task", "countdown", "--preset", "demo", "--seed", "0"],
          work="checkpoints/demo-latent-rl.work", after=[keep_metrics("latent-rl")], needs=("coconut-sft",),
          family="coconut"),
    Stage("compare", ["-m", "training.eval", "--checkpoint", "checkpoints/demo-token",
                      "--checkpoint", "checkpoints/demo-grpo", "--checkpoint", "checkpoints/demo",
                      "--checkpoint", "checkpoints/demo-ladir", "--checkpoint", "checkpoints/demo-ladir-s2",
                      "--checkpoint", "checkpoints/demo-ladi-rl", "--checkpoint", "checkpoints/demo-dlr-sft",
                      "--checkpoint", "checkpoints/demo-dlr", "--checkpoint", "checkpoints/demo-coconut",
                      "--checkpoint", "checkpoints/demo-coconut-grpo", "--checkpoint", "checkpoints/demo-latent-rl",
                      "--name", "token-sft", "--name", "token-grpo",
                      "--name", "ladir-codec", "--name", "ladir-writer", "--name", "ladir-sft", "--name", "ladi-rl",
                      "--name", "dlr-sft", "--name", "dlr", "--name", "coconut-sft", "--name", "coconut-grpo",
                      "--name", "latent-rl",
                      "--task", "countdown", "--problems", "500",
                      *(a for row in INTERMEDIATE_ROWS for a in ("--problems-for", f"{row}=100")),
                      "--k", K, "--out", "results/rl-demo"],
          after=[["-m", "training.rl_curves",
                  *(a for run in CURVES for a in ("--run", f"{run}=results/rl-demo/{run}-metrics.jsonl")),
                  "--out", "results/rl-demo/curves.png"]],
          needs=("sft", "writer", "prior-rollout", "grpo", "ladi-rl", "dlr-sft", "dlr", "coconut-sft", "coconut-grpo",
                 "latent-rl")),
]


def select(stages: list[Stage], families: set[str]) -> list[Stage]:
    """The core stages and those of the named families, in order. A family left out is not retrained;
    the checkpoints it would write must be there (the shipped ones), since the comparison reads them."""
    unknown = families - set(FAMILIES)
    if unknown:
        raise SystemExit(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(sorted(unknown))}: "
                         f"choose from {', '.join(FAMILIES)}")
    chosen = [st for st in stages if st.family == "core" or st.family in families]
    missing = [st.out for st in stages if st not in chosen and st.out and not Path(st.out, "ladi.json").is_file()]
    if missing:
        raise SystemExit(f"{', '.join(missing)} missing: the comparison reads it; retrain it with --all "
                         f"(or --with its family), or restore the shipped checkpoints (git checkout checkpoints)")
    return chosen


def run_stage(commands: list[list[str]], started: Path, previous: float) -> float:
    """Run a stage's commands in order; its time so far (`previous` + this go) is kept current in
    `started` while they run, so a killed pipeline keeps it. Returns the stage's total seconds."""
    t0 = time.time()

    def spent() -> float:
        seconds = previous + time.time() - t0
        started.write_text(json.dumps({"seconds": round(seconds, 1)}))
        return seconds

    spent()
    for command in commands:
        proc = subprocess.Popen(command)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=HEARTBEAT_S)
                    break
                except subprocess.TimeoutExpired:
                    spent()
        finally:
            spent()
            if proc.poll() is None:  # interrupted ourselves: stop the stage, keep its state
                proc.terminate()
                proc.wait()
        if rc:
            raise subprocess.CalledProcessError(rc, command)
    return spent()


def _stale(st: Stage, done: Path, finished: dict[str, float]) -> str | None:
    """Why a stage must run (not done; its command changed; a stage it reads finished after it), or None."""
    if not done.is_file():
        return "not done"
    record = json.loads(done.read_text())
    if record.get("args") != st.command:
        return "its command changed"
    newer = [n for n in st.needs if finished.get(n, 0.0) > record["finished"]]
    return f"{', '.join(newer)} finished after it" if newer else None


def run_pipeline(stages: list[Stage], state: Path, python: str, dry_run: bool = False,
                 report: Path | None = None) -> dict:
    """Run what is not done yet; returns {stage: seconds} for every finished stage."""
    state.mkdir(parents=True, exist_ok=True)
    times = {}
    finished: dict[str, float] = {}  # stage -> when it finished
    for st in stages:
        done, started = state / f"{st.name}.done", state / f"{st.name}.started"
        stale = _stale(st, done, finished)
        if stale is None:
            record = json.loads(done.read_text())
            times[st.name], finished[st.name] = record["seconds"], record["finished"]
            print(f"[demo] {st.name}: done before ({times[st.name]:.0f} s), skipped", flush=True)
            continue
        if done.is_file():
            print(f"[demo] {st.name}: done before, but {stale}: running it again", flush=True)
            if not dry_run:
                done.unlink()
                if st.work and Path(st.work).exists():
                    shutil.rmtree(st.work)
        cmd = [python, *st.command]
        previous = json.loads(started.read_text())["seconds"] if started.is_file() else 0.0
        if st.work and Path(st.work).exists():
            if started.is_file():
                cmd.append("--resume")
            elif not dry_run:
                shutil.rmtree(st.work)  # left by a run this pipeline did not start
        print(f"[demo] {st.name}: {' '.join(cmd)}", flush=True)
        if dry_run:
            continue
        seconds = run_stage([cmd, *([python, *extra] for extra in st.after)], started, previous)
        finished[st.name] = time.time()
        done.write_text(json.dumps({"command": " ".join(cmd), "args": st.command, "seconds": round(seconds, 1),
                                    "finished": finished[st.name]}))
        started.unlink()
        times[st.name] = round(seconds, 1)
        print(f"[demo] {st.name}: finished in {seconds / 60:.1f} min", flush=True)
    if report is not None and not dry_run and len(times) == len(stages):
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps({"stages_s": times, "total_s": round(sum(times.values()), 1),
                                      "total_h": round(sum(times.values()) / 3600, 2),
                                      "families": sorted({st.family for st in stages})}, indent=2) + "\n")
    return times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", default=".demo", help="where finished/started stages are recorded")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--dry-run", action="store_true", help="print what would run")
    p.add_argument("--with", dest="families", action="append", default=[], choices=FAMILIES,
                   help="also retrain this family's stages (repeatable); otherwise its rows are evaluated "
                   "from the shipped checkpoints")
    p.add_argument("--all", action="store_true", help="retrain every family (about 3.2 h on 2 cores)")
    args = p.parse_args(argv)
    stages = select(STAGES, set(FAMILIES) if args.all else set(args.families))
    print(f"[demo] stages: {' -> '.join(st.name for st in stages)}", flush=True)
    times = run_pipeline(stages, Path(args.state), args.python, args.dry_run,
                         report=Path("results/rl-demo/pipeline.json"))
    if not args.dry_run:
        print(f"[demo] all stages: {sum(times.values()) / 3600:.2f} h", flush=True)
    return times


if __name__ == "__main__":
    main()
