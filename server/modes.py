"""The three response modes: which of a request's candidates become its choices, and how they are
scored (the request's layout and verifier were settled by `validate.py` before it was queued).

- sample:    n choices spread over distinct latent plans (round-robin over plans).
- best_of_n: `best_of` candidates, the top n returned, ranked by the verifier when a reference is
             given, else by majority vote over extracted answers, else by mean token log-prob.
- pass_at_k: k = n candidates from k distinct plans, each verified against the reference, plus
             the unbiased pass@1..k.

A deterministic thinker (the recurrent policy) has one plan per question: its candidates are n
texts of that plan, and `latent_plans` above 1 is refused.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from ladi_core.generation import Completion
from ladi_core.metrics import pass_at_k
from ladi_core.verifiers import Verifier

from .validate import Layout


def spread(cands: list[Completion], lay: Layout) -> list[Completion]:
    """Candidates (plan-major) reordered round-robin over plans: the first M come from M plans."""
    m, s = lay.plans, lay.samples_per_plan
    return [cands[p * s + j] for j in range(s) for p in range(m) if p * s + j < len(cands)]


@dataclass
class Scored:
    cand: Completion
    score: float | None
    verified: bool | None


def verify_all(cands: list[Completion], verifier: Verifier, reference: Any) -> list[bool]:
    return [verifier.score(c.text, reference).solved for c in cands]


def select(mode: str, cands: list[Completion], lay: Layout, rule: str, verifier: Verifier | None,
           reference: Any) -> tuple[list[Scored], dict | None]:
    """Pick and annotate the returned choices. Runs verifiers: call it off the event loop.
    (`validate.plan_request` made sure pass_at_k has a reference and a verifier.)"""
    checked = verifier is not None and reference is not None
    if mode == "pass_at_k":
        chosen = spread(cands, lay)[: lay.choices]
        ok = verify_all(chosen, verifier, reference)
        k, c = len(chosen), sum(ok)
        summary = {"samples": k, "correct": c, "pass_at": {str(i): pass_at_k(k, c, i) for i in range(1, k + 1)}}
        return [Scored(x, float(v), v) for x, v in zip(chosen, ok)], summary
    if mode == "sample":
        chosen = spread(cands, lay)[: lay.choices]
        ok = verify_all(chosen, verifier, reference) if checked else [None] * len(chosen)
        return [Scored(x, None, v) for x, v in zip(chosen, ok)], None
    # best_of_n
    likelihood = [c.decoded.mean_logprob for c in cands]
    if rule in ("auto", "verifier") and checked:
        ok = verify_all(cands, verifier, reference)
        scores = [float(v) for v in ok]
    elif rule in ("auto", "majority", "verifier") and verifier is not None:
        answers = [verifier.extract_answer(c.text) for c in cands]
        votes = Counter(a for a in answers if a is not None)
        scores = [votes[a] / len(cands) if a is not None else 0.0 for a in answers]
        ok = [None] * len(cands)
    else:  # likelihood (validate.plan_request refused majority without an extractor)
        scores, ok = likelihood, [None] * len(cands)
    order = sorted(range(len(cands)), key=lambda i: (-scores[i], -likelihood[i], i))[: lay.choices]
    return [Scored(cands[i], scores[i], ok[i]) for i in order], None
