"""The GPU check (`make gpu-check`, run by `python -m benchmarks.gpu_check`): every training stage's
steps in bf16 on CUDA, greedy parity of the two backends where both are installed, and the server
under load with its NVML gauges. Each test writes its figures to $LADI_GPU_RESULTS/<name>.json.

Marked `gpu`: on a machine without CUDA they are collected and skipped. The script's dry run
(`--dry-run`, a test in tests/test_gpu_check.py) runs them here on the CPU at a few steps each
(LADI_GPU_DEVICE=cpu, LADI_GPU_DRY=1): the same commands, so the check a lent GPU runs is known to
work up to the device itself.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

DEVICE = os.environ.get("LADI_GPU_DEVICE", "cuda")
DRY = os.environ.get("LADI_GPU_DRY") == "1"
RESULTS = Path(os.environ.get("LADI_GPU_RESULTS", "results/gpu"))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: `make gpu-check` on a GPU machine (its CPU dry run: "
                       "`python -m benchmarks.gpu_check --dry-run`)"),
]


def record(name: str, **figures) -> dict:
    """Write one stage's figures, with what ran them."""
    row = {"stage": name, "device": device_name(), "precision": "bf16", "dry_run": DRY,
           "torch": torch.__version__, "python": platform.python_version(), **figures}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def device_name() -> str:
    if DEVICE.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(DEVICE))
    return f"cpu ({os.cpu_count()} cores)"


def reset_peak() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if DEVICE.startswith("cuda") else None


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory) -> Path:
    """training.sft on the smoke preset (a few steps in the dry run), on the device, in bf16."""
    from training import sft

    out = tmp_path_factory.mktemp("gpu") / "sft"
    argv = ["--preset", "smoke", "--out", str(out), "--seed", "0", "--device", DEVICE, "--precision", "bf16"]
    if DRY:
        argv += ["--max-steps", "3"]
    reset_peak()
    t0 = time.time()
    sft.main(argv)
    wall = time.time() - t0
    log = rows(out.with_name("sft.work") / "metrics.jsonl")
    losses = {s: [r["loss"] for r in log if r.get("stage") == s] for s in ("decoder", "codec", "prior")}
    done = next(r for r in log if r.get("stage") == "done")
    record("sft", wall_s=round(wall, 1), command="python -m training.sft " + " ".join(argv),
           peak_memory_gib=peak_gib(), **{f"{k}_s": done[f"{k}_s"] for k in ("decoder", "codec", "prior")},
           losses={s: {"first": v[0], "last": v[-1]} for s, v in losses.items() if v},
           token_pass_at_1=done["token_pass@1"], latent_pass_at_1=done["latent_pass@1"])
    assert all(math.isfinite(x) for v in losses.values() for x in v)
    return out


def test_sft_trains_every_stage_in_bf16_on_the_device(sft_checkpoint):
    from ladi_core.checkpoint import load_checkpoint

    ck = load_checkpoint(sft_checkpoint)
    assert ck.is_latent and (sft_checkpoint.with_name("sft-token") / "ladi.json").is_file()
    saved = json.loads((RESULTS / "sft.json").read_text())
    assert saved["decoder_s"] > 0 and saved["prior_s"] > 0


@pytest.mark.parametrize("algo", ["ladi", "grpo"])
def test_rl_steps_in_bf16_on_the_device(algo, sft_checkpoint, tmp_path):
    from training import rl

    init = sft_checkpoint if algo == "ladi" else sft_checkpoint.with_name("sft-token")
    out = tmp_path / f"rl-{algo}"
    argv = ["--algo", algo, "--init", str(init), "--out", str(out), "--preset", "smoke", "--device", DEVICE,
            "--precision", "bf16"]
    if algo == "ladi":
        argv += ["--text-policy-coef", "1"]  # the decoder trains too: every module's backward on the device
    if DRY:
        argv += ["--steps", "2", "--eval-questions", "4"]
    reset_peak()
    t0 = time.time()
    final = rl.main(argv)
    wall = time.time() - t0
    steps = [r for r in rows(out.with_name(out.name + ".work") / "metrics.jsonl") if "step" in r and "stage" not in r]
    assert steps and all(math.isfinite(r["policy_loss"]) for r in steps)
    record(f"rl-{algo}", wall_s=round(wall, 1), command="python -m training.rl " + " ".join(argv),
           peak_memory_gib=peak_gib(), steps=len(steps), step_s=statistics.fmean(r["step_s"] for r in steps),
           rollout_s=statistics.fmean(r["rollout_s"] for r in steps),
           samples_per_s=statistics.fmean(r["samples_per_s"] for r in steps),
           reward_mean=[r["reward_mean"] for r in steps], final_eval=final)
    assert "pass@1" in final


def test_greedy_text_is_the_same_on_both_backends(sft_checkpoint):
    """The transformers and vLLM backends on the device, greedy, the token checkpoint: the same texts."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        record("backend-parity", skipped="vLLM is not installed here")
        pytest.skip("vLLM is not installed here")
    if not DEVICE.startswith("cuda"):
        record("backend-parity", skipped="on the CPU the parity is tests/test_vllm_backend.py's")
        pytest.skip("on the CPU the parity is tests/test_vllm_backend.py's")
    from ladi_core.backends import SamplingParams
    from ladi_core.backends.vllm_options import VLLMOptions
    from ladi_core.generation import Reasoner
    from ladi_core.tasks import get_task

    token = sft_checkpoint.with_name("sft-token")
    qs = get_task("countdown").questions("test", 16, seed=0)
    greedy = SamplingParams(0.0, 1.0, 64)
    t0 = time.time()
    hf = Reasoner.from_checkpoint(token, device=DEVICE)
    a = [g.completions[0].text for g in hf.generate([q.prompt for q in qs], 1, greedy)]
    del hf
    engine = Reasoner.from_checkpoint(token, backend="vllm", options=VLLMOptions(dtype="float32", max_model_len=512,
                                                                                 gpu_memory_utilization=0.3))
    b = [g.completions[0].text for g in engine.generate([q.prompt for q in qs], 1, greedy)]
    engine.backend.close()
    same = sum(x == y for x, y in zip(a, b))
    record("backend-parity", questions=len(qs), same_greedy_text=same, wall_s=round(time.time() - t0, 1))
    assert same == len(qs)


def test_the_server_under_load_reports_its_gpu(sft_checkpoint, tmp_path):
    """The server on the device (transformers backend) under concurrent OpenAI-SDK requests: every
    request answered, and on a GPU the NVML gauges non-zero (absent on the CPU, with a log line)."""
    import httpx
    from openai import OpenAI

    from benchmarks.servers import free_port, start, stop

    port = free_port()
    log = (tmp_path / "server.log").open("w")
    cmd = [sys.executable, "-m", "server", "--checkpoint", str(sft_checkpoint), "--backend", "transformers",
           "--device", DEVICE, "--port", str(port)]
    t0 = time.time()
    proc, url = start(cmd, port, timeout=300, log=log)
    startup = time.time() - t0
    requests, workers = (8, 4) if DRY else (64, 16)
    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    model = None  # the served model's name, read first thing under load below

    def one(i: int) -> None:
        t = time.time()
        try:
            r = client.completions.create(model=model, prompt=f"Use 3, 5, 7 and {i % 9 + 1} to make 24.",
                                          max_tokens=64, n=4, seed=i)
            with lock:
                latencies.append(time.time() - t)
                tokens.append(r.usage.completion_tokens)
        except Exception as err:  # noqa: BLE001 - recorded and asserted below
            with lock:
                errors.append(repr(err))

    gauges_during = {}
    try:
        model = client.models.list().data[0].id
        t1 = time.time()
        threads = [threading.Thread(target=lambda k=k: [one(i) for i in range(k, requests, workers)])
                   for k in range(workers)]
        for th in threads:
            th.start()
        time.sleep(1.0)
        gauges_during = gpu_gauges(httpx.get(f"{url}/metrics").text)
        for th in threads:
            th.join()
        busy = time.time() - t1
        gauges_after = gpu_gauges(httpx.get(f"{url}/metrics").text)
    finally:
        stop(proc)
        log.close()
    record("server-load", startup_s=round(startup, 1), requests=requests, concurrency=workers, n=4,
           errors=errors[:5], completion_tokens=sum(tokens), completion_tokens_per_s=round(sum(tokens) / busy, 1),
           latency_p50_s=round(statistics.median(latencies), 3) if latencies else None,
           latency_max_s=round(max(latencies), 3) if latencies else None,
           gpu_gauges_during=gauges_during, gpu_gauges_after=gauges_after)
    assert not errors and len(latencies) == requests
    if DEVICE.startswith("cuda"):
        assert gauges_after.get('ladi:gpu_memory_used_bytes{gpu="0"}', 0) > 0
        assert 'ladi:gpu_utilization_perc{gpu="0"}' in gauges_after
    else:  # absent, not zero (the log line saying so: tests/test_gpu_gauges.py)
        assert not gauges_after


def gpu_gauges(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                    if line.startswith("ladi:gpu_"))}
