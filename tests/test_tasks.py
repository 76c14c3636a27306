import json
import re

import pytest

from ladi_core.tasks import CountdownConfig, CountdownTask, JsonlTask, get_task
from ladi_core.tasks.countdown import solve
from ladi_core.verifiers.arith import parse


def test_countdown_is_seeded_and_reproducible():
    t = get_task("countdown")
    assert [q.id for q in t.questions("test", 20, seed=3)] == [q.id for q in t.questions("test", 20, seed=3)]
    assert [q.id for q in t.questions("test", 20, seed=3)] != [q.id for q in t.questions("test", 20, seed=4)]


def test_countdown_train_and_test_never_overlap():
    t = get_task("countdown")
    test = {q.id for q in t.questions("test", 300)}
    train = {q.id for seed in range(3) for q in t.questions("train", 1000, seed=seed)}
    assert len(test) == 300 and not test & train


def test_every_countdown_question_has_several_verified_solutions():
    t = CountdownTask()
    for q in t.questions("test", 50):
        assert len(q.solutions) >= t.config.min_solutions
        answers = set()
        for s in q.solutions:
            r = t.verifier.score(s, q.reference)
            assert r.correct == 1.0, (q, s)
            answers.add(r.answer)
        assert len(answers) == len(q.solutions)  # distinct up to commutativity/associativity
        assert t.config.min_target <= q.reference["target"] <= t.config.max_target


def test_countdown_difficulty_knobs():
    t = CountdownTask(CountdownConfig(num_numbers=3, max_number=5, min_target=1, max_target=30,
                                      min_solutions=1))
    q = t.questions("train", 5)[0]
    assert len(q.reference["numbers"]) == 3 and max(q.reference["numbers"]) <= 5
    mixed = CountdownTask(CountdownConfig(num_numbers=4, min_numbers=3, max_number=20, max_target=99)).questions(
        "test", 40)
    assert {len(q.reference["numbers"]) for q in mixed} == {3, 4}


def test_solver_steps_are_consistent():
    """Every reference completion's steps are correct arithmetic on the numbers still in play."""
    import operator

    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    numbers = (2, 3, 4, 7)
    for target, by_canon in solve(numbers).items():
        for texts in by_canon.values():
            for text in texts:
                pool = list(numbers)
                *steps, answer = text.splitlines()
                for step in steps:
                    lhs, rhs = step.split("=")
                    a, op, b = re.fullmatch(r"(\d+)([+*-])(\d+)", lhs).groups()
                    assert ops[op](int(a), int(b)) == int(rhs) >= 0
                    pool.remove(int(a))
                    pool.remove(int(b))
                    pool.append(int(rhs))
                assert pool == [target] and answer.startswith("answer: ")


def test_countdown_subset_variant_has_verified_subset_solutions():
    t = CountdownTask(CountdownConfig(use_all=False))
    qs = t.questions("test", 40)
    assert all(q.reference["use_all"] is False and q.prompt.startswith("Make ") for q in qs)
    sizes = set()
    for q in qs:
        assert len(q.solutions) >= 2
        for s in q.solutions:
            assert t.verifier.score(s, q.reference).correct == 1.0, (q, s)
            sizes.add(len(parse(s.splitlines()[-1].removeprefix("answer: ")).numbers))
    assert sizes == {2, 3, 4}  # some solutions leave numbers out
    full = solve((2, 3, 4, 7))
    subset = solve((2, 3, 4, 7), False)
    assert set(full) <= set(subset) and "S(+2,+3)" in subset[5]


def test_jsonl_task(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"question": f"What is {i}+{i}?", "answer": str(2 * i), "solution": f"answer: {2 * i}"} for i in range(40)]
    rows.append({"question": "held out", "answer": "1", "split": "test"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = get_task(str(path), "math")
    test = task.questions("test", 1, seed=0)
    assert any(q.prompt == "held out" for q in task._splits["test"])
    train = task._splits["train"]
    assert {q.prompt for q in train}.isdisjoint({q.prompt for q in task._splits["test"]})
    q = train[0]
    assert task.verifier.score(q.solutions[0], q.reference).correct == 1.0
    assert len(test) == 1


def test_jsonl_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        JsonlTask(bad, "math")
    with pytest.raises(FileNotFoundError):
        JsonlTask(tmp_path / "missing.jsonl", "math")
    with pytest.raises(ValueError, match="--verifier"):
        get_task(str(bad))
    with pytest.raises(ValueError, match="unknown task"):
        get_task("sudoku")
