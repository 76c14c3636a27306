"""A tiny, bounded parser for + - * expressions over integers. Model text is never `eval`-ed.

Expressions are canonicalised up to commutativity and associativity (sums become multisets of
signed terms, products multisets of factors), so `3*4+5`, `5+4*3` and `(5+(3*4))` are the same
solution while `3*(4+5)` is another: that is what "distinct solutions" counts.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_CHARS = 200
MAX_DEPTH = 16
MAX_ABS = 10**9


class ArithError(ValueError):
    pass


@dataclass(frozen=True)
class Node:
    kind: str  # "num" | "sum" | "prod"
    value: int
    numbers: tuple[int, ...]  # the leaves, sorted: which given numbers were used
    canon: str
    parts: tuple = ()  # sum: ((sign, Node), ...); prod: (Node, ...)


def num(n: int) -> Node:
    return Node("num", n, (n,), str(n))


def _terms(node: Node, sign: int) -> list[tuple[int, Node]]:
    if node.kind == "sum":
        return [(sign * s, t) for s, t in node.parts]
    return [(sign, node)]


def _make_sum(terms: list[tuple[int, Node]]) -> Node:
    value = sum(s * t.value for s, t in terms)
    canon = "S(" + ",".join(sorted(("+" if s > 0 else "-") + t.canon for s, t in terms)) + ")"
    numbers = tuple(sorted(n for _, t in terms for n in t.numbers))
    return Node("sum", value, numbers, canon, tuple(terms))


def _make_prod(factors: list[Node]) -> Node:
    value = 1
    for f in factors:
        value *= f.value
        if abs(value) > MAX_ABS:
            raise ArithError("number too large")
    canon = "P(" + ",".join(sorted(f.canon for f in factors)) + ")"
    numbers = tuple(sorted(n for f in factors for n in f.numbers))
    return Node("prod", value, numbers, canon, tuple(factors))


def combine(a: Node, op: str, b: Node) -> Node:
    """a op b as a canonical node; used by the generator and by the parser alike."""
    if op == "+":
        node = _make_sum(_terms(a, 1) + _terms(b, 1))
    elif op == "-":
        node = _make_sum(_terms(a, 1) + _terms(b, -1))
    elif op == "*":
        fa = a.parts if a.kind == "prod" else (a,)
        fb = b.parts if b.kind == "prod" else (b,)
        node = _make_prod(list(fa) + list(fb))
    else:
        raise ArithError(f"unknown operator {op!r}")
    if abs(node.value) > MAX_ABS:
        raise ArithError("number too large")
    return node


def parse(text: str) -> Node:
    """Parse `text`; raise ArithError on anything malformed, too long, too deep or too large."""
    if not isinstance(text, str) or not text.strip():
        raise ArithError("empty expression")
    if len(text) > MAX_CHARS:
        raise ArithError("expression too long")
    tokens: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "+-*()":
            tokens.append(c)
            i += 1
        elif c in "0123456789":
            j = i
            while j < len(text) and text[j] in "0123456789":
                j += 1
            if j - i > 9:
                raise ArithError("number too large")
            tokens.append(text[i:j])
            i = j
        else:
            raise ArithError(f"unexpected character {c!r}")
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ArithError("unexpected end")
        pos += 1
        return tokens[pos - 1]

    def expr(depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise ArithError("expression nested too deeply")
        node = term(depth)
        while peek() in ("+", "-"):
            op = take()
            node = combine(node, op, term(depth))
        return node

    def term(depth: int) -> Node:
        node = atom(depth)
        while peek() == "*":
            take()
            node = combine(node, "*", atom(depth))
        return node

    def atom(depth: int) -> Node:
        tok = take()
        if tok == "(":
            node = expr(depth + 1)
            if take() != ")":
                raise ArithError("unbalanced parenthesis")
            return node
        if tok.isdigit():
            return num(int(tok))
        raise ArithError(f"unexpected token {tok!r}")

    node = expr(0)
    if pos != len(tokens):
        raise ArithError("trailing input")
    return node
