"""Reward and diversity over training, one curve per RL run, from their JSONL metrics logs.

    python -m training.rl_curves --run grpo=checkpoints/demo-grpo.work/metrics.jsonl \
        --run ladi=checkpoints/demo-ladi-rl.work/metrics.jsonl --out results/rl-demo/curves.png

Each run's metrics log is copied beside the plot (NAME-metrics.jsonl), so the figure can be
redrawn from what is committed.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

PANELS = [  # (metric, title); a run that does not log a metric skips that panel
    ("reward_mean", "reward (mean over texts)"),
    ("distinct_answers", "distinct answers per question"),
    ("token_entropy", "decoder token entropy (nats)"),
    ("plan_diversity", "plan diversity (mean pairwise latent distance)"),
]


def read_log(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "step" in r and "reward_mean" in r]


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(runs: dict[str, list[dict]], out: Path, window: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, title) in zip(axes, PANELS):
        for i, (name, rows) in enumerate(runs.items()):
            pts = [(r["step"], r[key]) for r in rows if key in r and not (key == "plan_diversity" and r[key] == 0)]
            if pts:
                steps, vals = zip(*pts)
                ax.plot(steps, smooth(list(vals), window), label=name, color=f"C{i}")  # one colour per run
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"RL training curves (moving average over {window} steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m training.rl_curves", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="NAME=path/to/metrics.jsonl (repeatable)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--window", type=int, default=10, help="moving-average window in steps")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    for spec in args.run:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_file():
            p.error(f"--run wants NAME=path/to/metrics.jsonl of an existing file, got {spec!r}")
        runs[name] = read_log(Path(path))
        if not runs[name]:
            p.error(f"{path}: no step metrics in it")
        copy = out.parent / f"{name}-metrics.jsonl"
        if Path(path).resolve() != copy.resolve():
            shutil.copyfile(path, copy)
    plot(runs, out, args.window)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
