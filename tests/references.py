"""References built from a model's own texts, so a recomputed pass@k or a verified choice is tested
on at least one correct candidate by construction, not by how a smoke model happened to train."""
from __future__ import annotations

from ladi_core.verifiers.arith import ArithError, parse
from ladi_core.verifiers.base import answer_line


def countdown_reference_solved_by(texts: list[str]) -> dict:
    """A Countdown reference that the first text with a parseable answer line solves: its own numbers,
    its own value as the target."""
    for text in texts:
        line = answer_line(text)
        if line is None:
            continue
        try:
            node = parse(line)
        except ArithError:
            continue
        return {"numbers": list(node.numbers), "target": node.value}
    raise AssertionError(f"none of the texts has a parseable answer line: {texts}")
