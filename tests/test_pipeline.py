"""`make demo`'s driver: finished stages are skipped, an interrupted one resumes, stale work is not."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.pipeline import CURVES, FAMILIES, INTERMEDIATE_ROWS, STAGES, Stage, run_pipeline, select

# A stand-in stage command: appends its argv to a log, and fails while a `fail-<stage>` file exists.
SCRIPT = """
import sys, pathlib, time
d = pathlib.Path(sys.argv[1])
(d / "log").open("a").write(" ".join(sys.argv[2:]) + "\\n")
(d / "work").mkdir(exist_ok=True)
time.sleep(0.2)  # every stage spends measurable time
if (d / f"fail-{sys.argv[2]}").exists():
    sys.exit(3)
"""


def stages(tmp: Path) -> list[Stage]:
    script = tmp / "stage.py"
    script.write_text(SCRIPT)
    return [Stage("a", [str(script), str(tmp), "a"]),
            Stage("b", [str(script), str(tmp), "b"], work=str(tmp / "work"))]


def test_a_failed_stage_resumes_and_finished_stages_are_skipped(tmp_path):
    state = tmp_path / "state"
    (tmp_path / "fail-b").touch()
    with pytest.raises(subprocess.CalledProcessError):
        run_pipeline(stages(tmp_path), state, sys.executable)
    assert (state / "a.done").is_file() and not (state / "b.done").exists()
    (tmp_path / "fail-b").unlink()
    times = run_pipeline(stages(tmp_path), state, sys.executable, report=tmp_path / "pipeline.json")
    log = (tmp_path / "log").read_text().splitlines()
    assert log == ["a", "b", "b --resume"]  # a ran once; b resumed the work it had started
    assert set(times) == {"a", "b"}
    report = json.loads((tmp_path / "pipeline.json").read_text())
    assert report["total_s"] == pytest.approx(sum(times.values()), abs=0.2)
    run_pipeline(stages(tmp_path), state, sys.executable)  # all done: nothing runs
    assert (tmp_path / "log").read_text().splitlines() == log


def test_stale_work_from_another_run_is_removed_not_resumed(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "stale").touch()
    run_pipeline(stages(tmp_path), tmp_path / "state", sys.executable)
    assert (tmp_path / "log").read_text().splitlines() == ["a", "b"]
    assert not (tmp_path / "work" / "stale").exists()


def test_the_demo_stages_match_what_the_readme_compares():
    by_name = {s.name: s for s in STAGES}
    names = list(by_name)
    assert names == ["sft", "writer", "prior-rollout", "grpo", "ladi-rl", "dlr-sft", "dlr", "coconut-sft",
                     "coconut-grpo", "latent-rl", "compare"]
    ladi, dlr = by_name["ladi-rl"].command, by_name["dlr"].command
    runs = [by_name[n].command for n in ("grpo", "ladi-rl", "dlr", "coconut-grpo", "latent-rl")]
    # the same budget: the same preset and seed, no budget flag on one side only
    budget = ("--steps", "--questions-per-step", "--plans", "--samples-per-plan", "--ppo-epochs")
    for flag in ("--preset", "--seed", "--task"):
        assert len({c[c.index(flag) + 1] for c in runs}) == 1
    assert not any(f in c for f in budget for c in runs)
    coconut = by_name["coconut-sft"].command
    assert coconut[coconut.index("--init") + 1] == "checkpoints/demo-token"  # the curriculum starts from CoT SFT
    for n in ("coconut-grpo", "latent-rl"):
        c = by_name[n].command
        assert c[c.index("--init") + 1] == coconut[coconut.index("--out") + 1]
    assert dlr[dlr.index("--init") + 1] == by_name["dlr-sft"].command[by_name["dlr-sft"].command.index("--out") + 1]
    writer, rollout = by_name["writer"].command, by_name["prior-rollout"].command
    assert rollout[rollout.index("--init") + 1] == writer[writer.index("--out") + 1]
    # LaDi-RL starts from the latent SFT model: the writer, then the prior's rollout stage
    assert ladi[ladi.index("--init") + 1] == rollout[rollout.index("--out") + 1]
    compared = by_name["compare"].command
    assert {"checkpoints/demo-ladi-rl", "checkpoints/demo-ladir-s2", "checkpoints/demo-ladir",
            "checkpoints/demo", "checkpoints/demo-dlr-sft", "checkpoints/demo-dlr", "checkpoints/demo-coconut",
            "checkpoints/demo-coconut-grpo", "checkpoints/demo-latent-rl"} <= set(compared)
    for st in STAGES:  # every stage reads only stages that come before it
        assert all(names.index(n) < names.index(st.name) for n in st.needs)


def test_make_demo_retrains_the_core_comparison_and_reads_the_other_families_from_their_checkpoints(
        tmp_path, monkeypatch):
    core = select(STAGES, set())
    assert [s.name for s in core] == ["sft", "writer", "prior-rollout", "grpo", "ladi-rl", "compare"]
    assert select(STAGES, set(FAMILIES)) == STAGES
    assert [s.name for s in select(STAGES, {"dlr"})] == ["sft", "writer", "prior-rollout", "grpo", "ladi-rl",
                                                         "dlr-sft", "dlr", "compare"]
    compared = next(s for s in STAGES if s.name == "compare").command
    for st in STAGES:  # every checkpoint a stage writes is a row of the comparison
        if st.out and st.name != "sft":
            assert st.out in compared, st.name
    for row in INTERMEDIATE_ROWS:  # fewer questions only for rows named intermediate
        assert f"{row}=100" in compared and row in compared
    curves = next(s for s in STAGES if s.name == "compare").after[0]
    for run, ckpt in CURVES.items():  # each RL stage keeps its log where the curves read it
        stage = next(s for s in STAGES if s.out == ckpt)
        assert any(f"results/rl-demo/{run}-metrics.jsonl" in cmd for cmd in stage.after)
        assert f"{run}=results/rl-demo/{run}-metrics.jsonl" in curves
    with pytest.raises(SystemExit, match="unknown family"):
        select(STAGES, {"nope"})
    monkeypatch.chdir(tmp_path)  # no shipped checkpoints here: leaving a family out is refused up front
    with pytest.raises(SystemExit, match="checkpoints/demo-dlr-sft"):
        select(STAGES, set())
    assert select(STAGES, set(FAMILIES)) == STAGES


def test_a_changed_command_and_a_rerun_dependency_make_later_stages_run_again(tmp_path):
    state = tmp_path / "state"
    script = tmp_path / "stage.py"
    script.write_text(SCRIPT)

    def three(b_flag: str) -> list[Stage]:
        return [Stage("a", [str(script), str(tmp_path), "a"]),
                Stage("b", [str(script), str(tmp_path), "b", b_flag], needs=("a",)),
                Stage("c", [str(script), str(tmp_path), "c"], needs=("b",)),
                Stage("d", [str(script), str(tmp_path), "d"], needs=("a",))]

    run_pipeline(three("x"), state, sys.executable)
    run_pipeline(three("y"), state, sys.executable)  # b's command changed: b runs, then c (reads b); d does not
    assert (tmp_path / "log").read_text().splitlines() == ["a", "b x", "c", "d", "b y", "c"]
    run_pipeline(three("y"), state, sys.executable)  # nothing is stale now
    assert len((tmp_path / "log").read_text().splitlines()) == 6


def test_an_interrupted_stage_keeps_the_time_it_spent(tmp_path):
    """The wall time of a stage run in two goes is the sum of both goes (what make demo reports)."""
    state = tmp_path / "state"
    (tmp_path / "fail-a").touch()
    with pytest.raises(subprocess.CalledProcessError):
        run_pipeline(stages(tmp_path)[:1], state, sys.executable)
    spent = json.loads((state / "a.started").read_text())["seconds"]
    assert spent >= 0.15
    (tmp_path / "fail-a").unlink()
    times = run_pipeline(stages(tmp_path)[:1], state, sys.executable)
    assert times["a"] >= spent + 0.15  # both goes, each >= 0.2 s (rounded to 0.1 s)
