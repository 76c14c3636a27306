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


def test_seed_spread_and_efficiency_from_the_logs(tmp_path):
    from training import rl_seeds

    def log(name, final, with_texts):
        rows = [{"step": s, "reward_mean": final + 0.5, "reward_correct": final if s >= 10 else 0.0,
                 "samples_per_s": 10.0, "step_s": 3.2, **({"texts": 64} if with_texts else {})} for s in range(20)]
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return path

    runs = [f"dlr:{s}={log(f'd{s}', 0.3 + 0.1 * s, True)}" for s in range(3)]
    runs.append(f"grpo:0={log('g0', 0.4, False)}")
    out = tmp_path / "res" / "stability"
    summary = rl_seeds.main([*sum((["--run", r] for r in runs), []), "--out", str(out), "--last", "5"])
    # the final reward is correctness (not reward_mean) over the last 5 steps
    assert summary["dlr"]["final_reward"] == {"0": 0.3, "1": 0.4, "2": 0.5}
    assert summary["dlr"]["range"] == pytest.approx(0.2) and summary["dlr"]["std"] == pytest.approx(0.0816, abs=1e-4)
    assert summary["grpo"]["seeds"] == 1 and summary["grpo"]["std"] == 0.0
    assert rl_seeds.texts({"samples_per_s": 10.0, "step_s": 3.2}) == 32  # older logs: throughput x time
    for f in ("stability.png", "stability-efficiency.png"):
        assert (out.parent / f).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out.parent / "stability.json").read_text()) == summary
    with pytest.raises(SystemExit):
        rl_seeds.main(["--run", f"dlr={tmp_path / 'd0.jsonl'}", "--out", str(out)])  # no seed
