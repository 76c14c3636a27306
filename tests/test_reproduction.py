"""training.reproduction: a rerun's table against the committed one, paired question by question."""
import json
import math

import pytest

from training import reproduction


def write(directory, rows):
    directory.mkdir()
    (directory / "per_question.jsonl").write_text("".join(
        json.dumps({"checkpoint": row, "id": q, "n": n, "c": c}) + "\n" for row, qs in rows.items() for q, n, c in qs))


def test_rows_are_compared_on_shared_questions_with_a_paired_standard_error(tmp_path):
    old = {"a": [("q1", 4, 1), ("q2", 4, 3), ("q3", 4, 0)], "b": [("q1", 4, 2)], "gone": [("q1", 4, 4)]}
    new = {"a": [("q1", 4, 2), ("q2", 4, 3)], "b": [("q1", 4, 2)], "new": [("q1", 4, 0)]}
    write(tmp_path / "old", old)
    write(tmp_path / "new", new)
    rows = {r.row: r for r in reproduction.main(["--committed", str(tmp_path / "old"), "--rerun",
                                                  str(tmp_path / "new"), "--k", "1,2"])}
    assert set(rows) == {"a", "b"}  # rows in both; "a" on the two questions both evaluated
    a = rows["a"]
    assert a.questions == 2 and not a.identical and rows["b"].identical
    assert a.committed[1] == pytest.approx((1 / 4 + 3 / 4) / 2) and a.rerun[1] == pytest.approx((2 / 4 + 3 / 4) / 2)
    # pass@2 with n = 4: 1 - C(n - c, 2) / C(4, 2); differences 1/3 - ... computed by hand
    p2 = lambda c: 1 - math.comb(4 - c, 2) / 6  # noqa: E731
    d = [p2(2) - p2(1), p2(3) - p2(3)]
    assert a.rerun[2] - a.committed[2] == pytest.approx(sum(d) / 2)
    mean = sum(d) / 2
    assert a.diff_se[2] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 1) / math.sqrt(2))
    assert a.within(3.0) and not a.within(0.5)
    table = (tmp_path / "t.md")
    reproduction.main(["--committed", str(tmp_path / "old"), "--rerun", str(tmp_path / "new"), "--k", "1",
                       "--out", str(table)])
    text = table.read_text()
    assert "| b | 1 | 50.0 -> 50.0 (+0.0, 0.0) | exactly |" in text


def test_missing_or_disjoint_evaluations_are_refused(tmp_path):
    write(tmp_path / "old", {"a": [("q1", 4, 1)]})
    write(tmp_path / "new", {"a": [("q9", 4, 1)]})
    with pytest.raises(SystemExit, match="share no row"):
        reproduction.main(["--committed", str(tmp_path / "old"), "--rerun", str(tmp_path / "new")])
    with pytest.raises(SystemExit, match="not found"):
        reproduction.main(["--committed", str(tmp_path / "old"), "--rerun", str(tmp_path / "nowhere")])
