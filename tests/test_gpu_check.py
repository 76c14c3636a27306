"""`make gpu-check` prepared for a GPU this machine does not have: its tests are collected and
skipped here with the reason, it refuses to run without a GPU unless told to run dry, and its dry
run (the same tests and commands, on the CPU, a few steps each) passes and writes every result file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GPU_TESTS = {
    "test_sft_trains_every_stage_in_bf16_on_the_device": "passed",
    "test_rl_steps_in_bf16_on_the_device[ladi]": "passed",
    "test_rl_steps_in_bf16_on_the_device[grpo]": "passed",
    "test_greedy_text_is_the_same_on_both_backends": "skipped",  # on the CPU: tests/test_vllm_backend.py's
    "test_the_server_under_load_reports_its_gpu": "passed",
}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU runs the check itself")


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LADI_GPU_")}


def test_the_gpu_tests_are_collected_and_skipped_with_their_reason():
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs",
                        "-p", "no:cacheprovider"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:]
    assert f"{len(GPU_TESTS)} skipped" in r.stdout and "needs a CUDA GPU" in r.stdout


def test_without_a_gpu_the_check_refuses_and_names_the_dry_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("gpu_check: torch sees no CUDA device")
    assert "--dry-run" in r.stderr


@pytest.mark.timeout(1200)
def test_the_dry_run_passes_and_writes_every_result(tmp_path):
    out = tmp_path / "gpu"
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out),
                        "--timeout", "1000"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1100)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["returncode"] == 0 and summary["machine"]["gpu"] is None
    assert {name: t["outcome"] for name, t in summary["tests"].items()} == GPU_TESTS
    rows = {stage: json.loads((out / f"{stage}.json").read_text())
            for stage in ("sft", "rl-ladi", "rl-grpo", "backend-parity", "server-load")}
    assert all(row["dry_run"] and row["precision"] == "bf16" for row in rows.values())
    assert rows["sft"]["decoder_s"] > 0 and "--max-steps 3" in rows["sft"]["command"]
    assert rows["rl-ladi"]["steps"] == 2 and rows["rl-grpo"]["steps"] == 2
    assert rows["server-load"]["completion_tokens"] > 0 and rows["server-load"]["gpu_gauges_after"] == {}
    assert "skipped" in rows["backend-parity"]
