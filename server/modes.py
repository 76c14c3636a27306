"""The three response modes on top of the shared generation path.

- sample:    n choices spread over distinct latent plans (round-robin over plans).
- best_of_n: `best_of` candidates, the top n returned, ranked by the verifier when a reference is
             given, else by majority vote over extracted answers, else by mean token log-prob.
- pass_at_k: k = n candidates from k distinct plans, each verified against the reference, plus
             the unbiased pass@1..k.

A deterministic thinker (the recurrent policy) has one plan per question: its candidates are n
texts of that plan, and `latent_plans` above 1 is refused.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ladi_core.generation import Completion
from ladi_core.metrics import pass_at_k
from ladi_core.verifiers import VERIFIERS, Verifier, get_verifier

from .config import Limits
from .errors import BadRequest
from .protocol import LadiParams


@dataclass(frozen=True)
class Layout:
    plans: int  # M latent plans (for a token-level checkpoint: 1)
    samples_per_plan: int  # N texts per plan
    choices: int  # n returned

    @property
    def total(self) -> int:
        return self.plans * self.samples_per_plan


def layout(req: LadiParams, latent: bool, limits: Limits, one_plan: bool = False) -> Layout:
    """How many plans and texts a request needs; every bound checked here (400 on violation).
    one_plan: the checkpoint's policy gives each question one plan (its thoughts are deterministic)."""
    n = req.n
    if not 1 <= n <= limits.max_n:
        raise BadRequest(f"n must be between 1 and {limits.max_n}, got {n}", "n")
    if req.best_of is not None and not 1 <= req.best_of <= limits.max_best_of:
        raise BadRequest(f"best_of must be between 1 and {limits.max_best_of}, got {req.best_of}", "best_of")
    for name, value, bound in (("latent_plans", req.latent_plans, limits.max_latent_plans),
                               ("samples_per_plan", req.samples_per_plan, limits.max_samples_per_plan)):
        if value is not None and not 1 <= value <= bound:
            raise BadRequest(f"{name} must be between 1 and {bound}, got {value}", name)
    if req.mode == "best_of_n":
        wanted = req.best_of if req.best_of is not None else max(n, 2 * n)
        if wanted < n:
            raise BadRequest(f"best_of ({wanted}) must be >= n ({n})", "best_of")
    else:
        wanted = n
    if one_plan and req.latent_plans not in (None, 1):
        raise BadRequest("this checkpoint's recurrent policy thinks deterministically, so every plan of a question "
                         "is the same one: leave latent_plans unset (or 1) and ask for n texts", "latent_plans")
    if not latent or one_plan:
        total = wanted if req.samples_per_plan is None else max(wanted, req.samples_per_plan)
        out = Layout(1, total, n)
    elif req.mode == "pass_at_k":
        if req.latent_plans is not None and req.latent_plans != n:
            raise BadRequest("pass_at_k draws k = n candidates from k distinct plans: leave latent_plans "
                             "unset or equal to n", "latent_plans")
        out = Layout(n, 1, n)
    else:
        spp = req.samples_per_plan
        plans = req.latent_plans or (wanted if spp is None else math.ceil(wanted / spp))
        spp = spp or math.ceil(wanted / plans)
        if plans * spp < wanted:
            raise BadRequest(f"latent_plans x samples_per_plan = {plans * spp} < the {wanted} candidates needed",
                             "samples_per_plan")
        out = Layout(plans, spp, n)
    if out.total > limits.max_sequences:
        raise BadRequest(f"this request needs {out.total} sequences; the limit is {limits.max_sequences}",
                         "latent_plans")
    return out


def spread(cands: list[Completion], lay: Layout) -> list[Completion]:
    """Candidates (plan-major) reordered round-robin over plans: the first M come from M plans."""
    m, s = lay.plans, lay.samples_per_plan
    return [cands[p * s + j] for j in range(s) for p in range(m) if p * s + j < len(cands)]


def resolve_verifier(name: str | None, task: str | None) -> tuple[str, Verifier | None]:
    """(ranking rule, answer verifier). Rules: a task verifier's name, 'majority', 'likelihood'."""
    task_verifier = get_verifier(task) if task in VERIFIERS else None
    if name is None:
        return "auto", task_verifier
    if name in ("majority", "likelihood"):
        return name, task_verifier
    if name in VERIFIERS:
        return "verifier", get_verifier(name)
    raise BadRequest(f"unknown verifier {name!r}: use one of {sorted(VERIFIERS) + ['majority', 'likelihood']}",
                     "verifier")


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
