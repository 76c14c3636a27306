"""Does a rerun reproduce a committed comparison? Row by row, question by question.

    python -m training.reproduction --committed results/rl-demo --rerun /path/to/rerun/results/rl-demo \
        [--k 1,8,64] [--out results/rl-demo/reproduction.md]

Both directories are `training.eval` outputs (their `per_question.jsonl`). Each row present in both
is compared on the questions both evaluated (a row evaluated on the first N questions, as
`--problems-for` does, is compared on those N): per k, the committed and rerun pass@k, their paired
difference and its standard error over questions. A row reproduces when every difference is within
`--sigmas` standard errors (sampling noise: a retrained checkpoint samples differently), and
exactly when every question's correct count is the same.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ladi_core.metrics import pass_at_k


@dataclass(frozen=True)
class RowComparison:
    row: str
    questions: int
    committed: dict[int, float]  # k -> pass@k in [0, 1]
    rerun: dict[int, float]
    diff_se: dict[int, float]  # k -> standard error of the paired difference
    identical: bool  # every question's correct count equal

    def within(self, sigmas: float) -> bool:
        return all(abs(self.rerun[k] - self.committed[k]) <= sigmas * self.diff_se[k] + 1e-12 for k in self.committed)


def read_rows(directory: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """row -> question id -> (samples n, correct c), in the file's order."""
    rows: dict[str, dict[str, tuple[int, int]]] = {}
    path = directory / "per_question.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (give a training.eval output directory)")
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["checkpoint"], {})[r["id"]] = (r["n"], r["c"])
    return rows


def compare_row(row: str, committed: dict[str, tuple[int, int]], rerun: dict[str, tuple[int, int]],
                ks: list[int]) -> RowComparison | None:
    """The row on the questions both runs evaluated (None when they share none)."""
    ids = [q for q in committed if q in rerun]
    if not ids:
        return None
    before, after, se = {}, {}, {}
    for k in ks:
        a = [pass_at_k(*committed[q], k) for q in ids]
        b = [pass_at_k(*rerun[q], k) for q in ids]
        d = [y - x for x, y in zip(a, b)]
        before[k], after[k] = statistics.fmean(a), statistics.fmean(b)
        se[k] = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return RowComparison(row, len(ids), before, after, se, all(committed[q] == rerun[q] for q in ids))


def compare(committed: Path, rerun: Path, ks: list[int]) -> list[RowComparison]:
    old, new = read_rows(committed), read_rows(rerun)
    out = [compare_row(row, old[row], new[row], ks) for row in old if row in new]
    return [c for c in out if c is not None]


def markdown(rows: list[RowComparison], ks: list[int], sigmas: float) -> str:
    head = ["row", "questions"] + [f"pass@{k} committed -> rerun (diff, SE)" for k in ks] + ["reproduced"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [f"{100 * r.committed[k]:.1f} -> {100 * r.rerun[k]:.1f} ({100 * (r.rerun[k] - r.committed[k]):+.1f}, "
                 f"{100 * r.diff_se[k]:.1f})" for k in ks]
        verdict = "exactly" if r.identical else f"within {sigmas:g} SE" if r.within(sigmas) else "NO"
        lines.append(f"| {r.row} | {r.questions} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines) + ("\n\nPaired over the questions both runs evaluated; SE = standard error of the "
                               "per-question difference. 'exactly': every question's correct count is equal.\n")


def main(argv=None) -> list[RowComparison]:
    p = argparse.ArgumentParser(prog="python -m training.reproduction", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--committed", required=True, type=Path, help="the committed training.eval output")
    p.add_argument("--rerun", required=True, type=Path, help="the rerun's training.eval output")
    p.add_argument("--k", default="1,8,64")
    p.add_argument("--sigmas", type=float, default=3.0, help="how many standard errors count as noise")
    p.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = p.parse_args(argv)
    ks = sorted({int(k) for k in args.k.split(",")})
    rows = compare(args.committed, args.rerun, ks)
    if not rows:
        raise SystemExit("the two evaluations share no row and question")
    table = markdown(rows, ks, args.sigmas)
    print(table)
    if args.out:
        args.out.write_text(table)
    return rows


if __name__ == "__main__":
    main()
