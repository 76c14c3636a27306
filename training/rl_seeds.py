"""Stability across seeds and sample efficiency, from RL runs' JSONL metrics logs.

    python -m training.rl_seeds --run dlr:0=a/metrics.jsonl --run dlr:1=b/metrics.jsonl ... \
        --run token-grpo:0=c/metrics.jsonl ... --out results/rl-demo/stability

Each --run is METHOD:SEED=path. Writes OUT.png (the reward curve of every seed, one panel per
method), OUT-efficiency.png (reward against texts decoded, every run) and OUT.json: per method,
each seed's final reward (the mean over the last `--last` steps) and their spread (population std,
max - min). The reward plotted is correctness (`reward_correct`) where a log has it, so a method
paid a format bonus is not drawn higher for it; logs from before the reward list fall back to
`reward_mean`. The logs are copied beside the figures (OUT-METHOD-sSEED.jsonl).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from .rl_curves import read_log, smooth


def correctness(row: dict) -> float:
    return row.get("reward_correct", row["reward_mean"])


def texts(row: dict) -> float:
    """Texts the step decoded (older logs: throughput x step time)."""
    return row["texts"] if "texts" in row else round(row["samples_per_s"] * row["step_s"])


def summarize(runs: dict[str, dict[int, list[dict]]], last: int) -> dict:
    out = {}
    for method, seeds in runs.items():
        finals = {s: statistics.fmean(correctness(r) for r in rows[-last:]) for s, rows in sorted(seeds.items())}
        vals = list(finals.values())
        out[method] = {"final_reward": {str(s): round(v, 4) for s, v in finals.items()},
                       "mean": round(statistics.fmean(vals), 4), "std": round(statistics.pstdev(vals), 4),
                       "range": round(max(vals) - min(vals), 4), "seeds": len(vals), "last_steps": last,
                       "steps": {str(s): len(rows) for s, rows in sorted(seeds.items())}}
    return out


def plot(runs: dict[str, dict[int, list[dict]]], out: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 3.6), sharey=True, squeeze=False)
    for ax, (method, seeds) in zip(axes[0], runs.items()):
        for i, (seed, rows) in enumerate(sorted(seeds.items())):
            ax.plot([r["step"] for r in rows], smooth([correctness(r) for r in rows], window), color=f"C{i}",
                    label=f"seed {seed}")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("reward (correctness)")
    fig.suptitle(f"stability across seeds (moving average over {window} steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m, (method, seeds) in enumerate(runs.items()):
        for j, (_, rows) in enumerate(sorted(seeds.items())):
            spent, total = [], 0
            for r in rows:
                total += texts(r)
                spent.append(total)
            ax.plot(spent, smooth([correctness(r) for r in rows], window), color=f"C{m}", alpha=0.9 if j == 0 else 0.45,
                    label=method if j == 0 else None)
    ax.set_xlabel("texts decoded (rollouts spent)")
    ax.set_ylabel("reward (correctness)")
    ax.set_title("sample efficiency: reward against rollouts spent", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "-efficiency.png"), dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.rl_seeds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="METHOD:SEED=path/to/metrics.jsonl (repeatable)")
    p.add_argument("--out", required=True, help="output path without extension")
    p.add_argument("--window", type=int, default=10, help="moving-average window in steps")
    p.add_argument("--last", type=int, default=20, help="steps the final reward averages over")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[int, list[dict]]] = {}
    for spec in args.run:
        label, sep, path = spec.partition("=")
        method, colon, seed = label.rpartition(":")
        if not sep or not colon or not method or not seed.isdigit() or not Path(path).is_file():
            p.error(f"--run wants METHOD:SEED=path/to/metrics.jsonl of an existing file, got {spec!r}")
        rows = read_log(Path(path))
        if not rows:
            p.error(f"{path}: no step metrics in it")
        if int(seed) in runs.setdefault(method, {}):
            p.error(f"{method} seed {seed} given twice")
        runs[method][int(seed)] = rows
        copy = out.with_name(f"{out.name}-{method}-s{seed}.jsonl")
        if Path(path).resolve() != copy.resolve():
            shutil.copyfile(path, copy)
    summary = summarize(runs, args.last)
    plot(runs, out, args.window)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
