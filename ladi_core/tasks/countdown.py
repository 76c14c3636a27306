"""Countdown: combine the given numbers with + - * to reach the target, each number exactly once
(`use_all`) or at most once (at least two of them).

Prompts read "Make 35 from 3 4 9 8." (the demo rule: each number at most once) or, with
`use_all`, "Use 3 4 9 8 to make 35.". Questions are drawn from a seeded generator that enumerates
every solution of a number set, so a target is only offered when it has at least `min_solutions`
distinct solutions (distinct up to commutativity and associativity). Reference completions are
chain-of-thought steps, one `a op b=c` per line, then `answer: <expression>`.
"""
from __future__ import annotations

import functools
import random
from collections import defaultdict
from dataclasses import dataclass

from ..verifiers.arith import Node, combine, num
from ..verifiers.countdown import CountdownVerifier
from .base import Question, check_split, in_test_split


@dataclass(frozen=True)
class CountdownConfig:
    """Difficulty knobs. The defaults are the demo task: 4 numbers 1-9, any two or more of them
    (each at most once), targets 10-60 with at least 4 distinct solutions: 3,548 questions, 508 of
    them held out (15%, so that a 500-question evaluation fits). Four solutions rather than three
    put the token-level SFT model in the 30-60% pass@1 band the RL stage needs room in. With
    `min_numbers` set, a question has between `min_numbers` and `num_numbers` numbers (drawn
    uniformly, before the target)."""

    num_numbers: int = 4
    min_numbers: int | None = None  # None: always num_numbers
    min_number: int = 1
    max_number: int = 9
    min_target: int = 10
    max_target: int = 60
    min_solutions: int = 4
    use_all: bool = False  # True: every number exactly once (classic); False: two or more, each at most once
    test_percent: int = 15


@dataclass(frozen=True)
class _Item:
    node: Node
    expr: str
    prec: int  # 1 sum, 2 product, 3 number


def _join(a: _Item, op: str, b: _Item) -> _Item:
    if op == "+":
        return _Item(combine(a.node, op, b.node), f"{a.expr}+{b.expr}", 1)
    if op == "-":
        rb = f"({b.expr})" if b.prec == 1 else b.expr
        return _Item(combine(a.node, op, b.node), f"{a.expr}-{rb}", 1)
    la = f"({a.expr})" if a.prec == 1 else a.expr
    rb = f"({b.expr})" if b.prec == 1 else b.expr
    return _Item(combine(a.node, op, b.node), f"{la}*{rb}", 2)


@functools.lru_cache(maxsize=4096)
def solve(numbers: tuple[int, ...], use_all: bool = True) -> dict[int, dict[str, list[str]]]:
    """target -> canonical solution -> completions (step-by-step texts) reaching it.

    use_all=False also counts every intermediate result as a solution (it used a subset)."""
    out: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))

    def record(item: _Item, steps: list[str]) -> None:
        out[item.node.value][item.node.canon].append("\n".join(steps) + f"\nanswer: {item.expr}")

    def rec(pool: list[_Item], steps: list[str]) -> None:
        if steps and not use_all:
            record(pool[-1], steps)  # the newest item is the last step's result
        if len(pool) == 1:
            if use_all:
                record(pool[0], steps)
            return
        for i in range(len(pool)):
            for j in range(i + 1, len(pool)):
                rest = [p for k, p in enumerate(pool) if k not in (i, j)]
                a, b = (pool[i], pool[j]) if pool[i].node.value >= pool[j].node.value else (pool[j], pool[i])
                for op in "+-*":
                    new = _join(a, op, b)
                    step = f"{a.node.value}{op}{b.node.value}={new.node.value}"
                    rec(rest + [new], steps + [step])

    rec([_Item(num(n), str(n), 3) for n in numbers], [])
    return {t: dict(s) for t, s in out.items()}


@functools.lru_cache(maxsize=65536)
def eligible_targets(c: CountdownConfig, numbers: tuple[int, ...]) -> list[int]:
    """Targets in range with at least `min_solutions` distinct solutions."""
    sols = solve(numbers, c.use_all)
    return [t for t in sorted(sols) if c.min_target <= t <= c.max_target and len(sols[t]) >= c.min_solutions]


class CountdownTask:
    name = "countdown"

    def __init__(self, config: CountdownConfig | None = None):
        self.config = config or CountdownConfig()
        self.verifier = CountdownVerifier()

    def _targets(self, numbers: tuple[int, ...]) -> list[int]:
        return eligible_targets(self.config, numbers)

    def _draw(self, rng: random.Random, split: str) -> Question:
        c = self.config
        count = c.num_numbers if c.min_numbers is None else rng.randint(c.min_numbers, c.num_numbers)
        while True:
            numbers = tuple(sorted(rng.randint(c.min_number, c.max_number) for _ in range(count)))
            sols = solve(numbers, c.use_all)
            targets = self._targets(numbers)
            if not targets:
                continue
            target = rng.choice(targets)
            key = f"countdown:{','.join(map(str, numbers))}:{target}"
            if in_test_split(key, c.test_percent) != (split == "test"):
                continue
            shown = " ".join(map(str, rng.sample(numbers, len(numbers))))
            completions = tuple(rng.choice(v) for v in sols[target].values())  # one per distinct solution
            prompt = (f"Use {shown} to make {target}." if c.use_all
                      else f"Make {target} from {shown}.")
            return Question(
                id=key,
                prompt=prompt,
                reference={"numbers": list(numbers), "target": target, "use_all": c.use_all},
                solutions=completions,
            )

    def questions(self, split: str, n: int, seed: int = 0) -> list[Question]:
        check_split(split)
        rng = random.Random(f"{seed}:{split}")
        seen: set[str] = set()
        out: list[Question] = []
        for _ in range(n * 1000):
            q = self._draw(rng, split)
            if q.id not in seen:
                seen.add(q.id)
                out.append(q)
                if len(out) == n:
                    return out
        raise ValueError(f"countdown: could only find {len(out)} distinct {split} questions, asked for {n}")

    def stream(self, split: str, seed: int = 0):
        """An endless stream of questions (repeats allowed): SFT and RL draw from it."""
        check_split(split)
        rng = random.Random(f"stream:{seed}:{split}")
        while True:
            yield self._draw(rng, split)

    def sample_solution(self, question: Question, rng: random.Random) -> str:
        return rng.choice(question.solutions)
