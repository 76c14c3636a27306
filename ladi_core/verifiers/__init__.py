"""Verifiers: text + reference -> Reward(correct, format). Registry by name."""
from __future__ import annotations

from .base import Reward, Verifier
from .code import CodeVerifier
from .countdown import CountdownVerifier
from .math import MathVerifier

VERIFIERS: dict[str, type] = {v.name: v for v in (CountdownVerifier, MathVerifier, CodeVerifier)}


def get_verifier(name: str) -> Verifier:
    try:
        return VERIFIERS[name]()
    except KeyError:
        raise ValueError(f"unknown verifier {name!r}; choose one of {sorted(VERIFIERS)}") from None


__all__ = ["Reward", "Verifier", "get_verifier", "VERIFIERS"]
