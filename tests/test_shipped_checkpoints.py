"""Every committed figure rests on the shipped checkpoints behaving as they did when the figures
were made: each one's greedy texts (two plans per prompt from fixed seeds, for a latent one) are
the ones recorded in tests/data/greedy_texts.json, and `training.eval` counts, question by
question, the correct texts that the committed comparison (results/rl-demo) counted. A refactor
that moves a plan, a prefix or a sampler default changes a text here before it changes a figure.

Re-record (only for a deliberate change, saying why in the commit):
    python -m tests.test_shipped_checkpoints --write
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ladi_core.backends import SamplingParams
from ladi_core.generation import Reasoner
from ladi_core.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.name for p in (ROOT / "checkpoints").iterdir() if (p / "ladi.json").is_file())
RECORD = Path(__file__).with_name("data") / "greedy_texts.json"
QUESTIONS = 3  # held-out countdown questions, the ones every evaluation starts with


def greedy_texts(name: str) -> list[list[str]]:
    """Per prompt: the greedy text of each of two seeded plans (one for a token-level checkpoint or
    a deterministic thinker, which has one plan per question)."""
    r = Reasoner.from_checkpoint(ROOT / "checkpoints" / name)
    prompts = [q.prompt for q in get_task("countdown").questions("test", QUESTIONS, seed=0)]
    plans = 2 if r.distinct_plans else 1
    gens = r.generate(prompts, plans, 1, SamplingParams(temperature=0.0, max_tokens=64, seed=7))
    return [[c.text for c in g.completions] for g in gens]


def test_every_shipped_checkpoint_has_recorded_texts():
    assert sorted(json.loads(RECORD.read_text())) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_greedy_texts_of_a_shipped_checkpoint_are_unchanged(name):
    want = json.loads(RECORD.read_text())[name]
    got = greedy_texts(name)
    assert got == want
    assert any(t for texts in got for t in texts)  # a checkpoint that writes nothing is no evidence


def test_training_eval_reproduces_the_committed_comparison_question_by_question(tmp_path):
    """The first 32 questions (one evaluation batch, as in the committed run) x 64 samples of the
    RL checkpoints the issue-31 table compares: each question's correct count equals the committed
    one (results/rl-demo/per_question.jsonl, made with the same seed)."""
    names = {"token-grpo": "demo-grpo", "ladi-rl": "demo-ladi-rl"}
    cmd = [sys.executable, "-m", "training.eval", "--task", "countdown", "--problems", "32", "--k", "1,64",
           "--seed", "1234", "--probe-questions", "0", "--diagnostic-questions", "0", "--out", str(tmp_path)]
    for name, ckpt in names.items():
        cmd += ["--checkpoint", str(ROOT / "checkpoints" / ckpt), "--name", name]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=1200)
    committed: dict[str, list[tuple[str, int]]] = {n: [] for n in names}
    for line in (ROOT / "results" / "rl-demo" / "per_question.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["checkpoint"] in committed:
            committed[r["checkpoint"]].append((r["id"], r["c"]))
    got: dict[str, list[tuple[str, int]]] = {n: [] for n in names}
    for line in (tmp_path / "per_question.jsonl").read_text().splitlines():
        r = json.loads(line)
        got[r["checkpoint"]].append((r["id"], r["c"]))
    for name in names:
        assert len(got[name]) == 32 and sum(c for _, c in got[name]) > 0
        assert got[name] == committed[name][:32], name


if __name__ == "__main__" and "--write" in sys.argv:
    RECORD.write_text(json.dumps({n: greedy_texts(n) for n in SHIPPED}, indent=1) + "\n")
    print(f"wrote {RECORD}")
