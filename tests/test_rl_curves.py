"""training.rl_curves: the reward/diversity figure is drawn from the runs' JSONL logs, which are
copied beside it; bad --run specs are refused."""
import json

import pytest

from training import rl_curves


def _log(path, algo_diversity: bool):
    rows = [{"step": s, "reward_mean": 0.2 + 0.01 * s, "distinct_answers": 10 - s * 0.1, "token_entropy": 0.1,
             "plan_diversity": 3.0 + s if algo_diversity else 0.0} for s in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"stage": "final", "pass@1": 0.3}\n')
    return path


def test_curves_from_two_runs(tmp_path):
    a, b = _log(tmp_path / "a.jsonl", False), _log(tmp_path / "b.jsonl", True)
    out = tmp_path / "fig" / "curves.png"
    rl_curves.main(["--run", f"grpo={a}", "--run", f"ladi={b}", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out.parent / "ladi-metrics.jsonl").read_text() == b.read_text()
    assert len(rl_curves.read_log(b)) == 30  # the final line is not a step
    assert rl_curves.smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def test_bad_run_specs_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        rl_curves.main(["--run", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.png")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit):
        rl_curves.main(["--run", f"x={empty}", "--out", str(tmp_path / "x.png")])
