"""The response modes' choices on hand-made candidates: best_of_n must pick the correct, the most
voted, or the most likely candidates (each known by construction), and pass_at_k counts them."""
from __future__ import annotations

from math import comb

import pytest

from ladi_core.backends.base import Decoded
from ladi_core.generation import Completion
from ladi_core.verifiers import get_verifier
from server.modes import select
from server.validate import Layout

REF = {"numbers": [2, 3, 4, 5], "target": 23}
RIGHT = "(2+4)*3+5"  # = 23 with each number once
WRONG = "2+3+4+5"  # = 14


def cand(answer: str | None, token_logprobs: list[float], plan: int = 0) -> Completion:
    text = "think\n" + (f"answer: {answer}" if answer is not None else "no answer")
    return Completion(text, plan, Decoded(text, list(range(len(token_logprobs))), sum(token_logprobs), "stop",
                                         list(token_logprobs)))


def test_best_of_n_with_a_reference_returns_the_correct_candidate_over_likelier_wrong_ones():
    cands = [cand(WRONG, [-0.1] * 4), cand(None, [-0.2] * 4), cand(RIGHT, [-3.0] * 4), cand(WRONG, [-0.5] * 4)]
    chosen, summary = select("best_of_n", cands, Layout(4, 1, 1), "auto", get_verifier("countdown"), REF)
    assert summary is None and len(chosen) == 1
    assert chosen[0].cand is cands[2] and chosen[0].verified is True and chosen[0].score == 1.0
    # n = 2: the correct one, then the likelier of the wrong ones
    chosen, _ = select("best_of_n", cands, Layout(4, 1, 2), "verifier", get_verifier("countdown"), REF)
    assert [c.cand for c in chosen] == [cands[2], cands[0]] and [c.verified for c in chosen] == [True, False]


def test_best_of_n_by_majority_returns_the_most_voted_answer_over_likelier_minorities():
    other = "2*3*4-5+4"
    # the third is RIGHT written another way: the same canonical answer, the same vote
    cands = [cand(other, [-0.1] * 3), cand(RIGHT, [-2.0] * 3), cand("5+3*(4+2)", [-2.5] * 3),
             cand(RIGHT, [-1.5] * 3), cand(None, [-0.05] * 3), cand(other, [-0.2] * 3)]
    verifier = get_verifier("countdown")
    votes = {}
    for c in cands:
        a = verifier.extract_answer(c.text)
        votes[a] = votes.get(a, 0) + (a is not None)
    top = max((a for a in votes if a is not None), key=votes.get)
    assert top == verifier.extract_answer(cands[1].text) and votes[top] == 3  # the setup: RIGHT has the most votes
    chosen, _ = select("best_of_n", cands, Layout(6, 1, 2), "majority", verifier, None)
    # RIGHT's two likeliest candidates; scores are vote shares, nothing verified without a reference
    assert [c.cand for c in chosen] == [cands[3], cands[1]]
    assert [c.score for c in chosen] == [3 / 6, 3 / 6] and all(c.verified is None for c in chosen)


def test_best_of_n_by_likelihood_ranks_by_mean_token_logprob_not_the_sum():
    # the long text has the lowest sum and the highest mean: a sum ranking would put it last
    cands = [cand(WRONG, [-0.5] * 2), cand(WRONG, [-0.1] * 20), cand(WRONG, [-0.3] * 4)]
    chosen, _ = select("best_of_n", cands, Layout(3, 1, 3), "likelihood", None, None)
    means = [sum(c.decoded.token_logprobs) / len(c.decoded.token_logprobs) for c in cands]
    assert [c.cand for c in chosen] == [cands[i] for i in sorted(range(3), key=lambda i: -means[i])]
    assert [c.score for c in chosen] == pytest.approx(sorted(means, reverse=True))
    assert chosen[0].cand is cands[1]


def test_pass_at_k_counts_the_correct_candidates_one_per_plan():
    cands = [cand(RIGHT, [-1.0], plan=0), cand(WRONG, [-1.0], plan=1), cand(RIGHT, [-1.0], plan=2),
             cand(None, [-1.0], plan=3)]
    chosen, summary = select("pass_at_k", cands, Layout(4, 1, 4), "auto", get_verifier("countdown"), REF)
    assert [c.verified for c in chosen] == [True, False, True, False]
    assert summary["samples"] == 4 and summary["correct"] == 2
    for k in range(1, 5):
        assert summary["pass_at"][str(k)] == pytest.approx(1 - comb(2, k) / comb(4, k))


@pytest.mark.slow
def test_majority_without_an_answer_extractor_is_refused_before_anything_is_queued(latent_reasoner):
    """A checkpoint with no task and no `verifier` named: best_of_n by majority is a 400 from the
    request's validation, so no plan is denoised and no text decoded for it."""
    from dataclasses import replace

    from ladi_core.generation import Reasoner
    from server.config import ServerConfig
    from server.errors import BadRequest
    from server.protocol import CompletionRequest
    from server.validate import plan_request

    ck = latent_reasoner.checkpoint
    taskless = Reasoner(replace(ck, config=ck.config.model_copy(update={"task": None})), latent_reasoner.backend,
                        latent_reasoner.embed_tokens)
    cfg = ServerConfig(checkpoint=str(ck.path))
    req = CompletionRequest(prompt="Make 23 from 3 4 5 2.", n=2, mode="best_of_n", verifier="majority")
    with pytest.raises(BadRequest) as err:
        plan_request(cfg, taskless, req, "m")
    assert err.value.param == "verifier" and "answer extractor" in str(err.value)
    # naming a task verifier is the fix the message gives, and it is accepted
    assert plan_request(cfg, taskless, req.model_copy(update={"verifier": "countdown"}), "m").rule == "verifier"
