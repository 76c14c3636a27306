"""The README's main command, `python -m server`, as a user runs it: a subprocess on a checkpoint
with the default backend (`auto`: vLLM, which `make venv` installs), answering the OpenAI SDK."""
from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from openai import OpenAI

from benchmarks.servers import free_port, start, stop

pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    """Our environment without anything that sizes vLLM's KV cache (an engine built earlier in this
    process set VLLM_CPU_KVCACHE_SPACE): the server must size it itself."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}


def start_server(ckpt, log, log_path, *flags: str, env: dict | None = None):
    """`python -m server` on `ckpt` (the default backend unless `flags` say otherwise), its output in
    `log`; a server that does not come up fails the test with the end of its log."""
    port = free_port()
    try:
        return start([sys.executable, "-m", "server", "--checkpoint", str(ckpt), "--port", str(port),
                      "--log-level", "warning", *flags], port, timeout=240, log=log,
                     env=clean_env() if env is None else env)
    except RuntimeError as err:
        raise AssertionError(f"{err}\n{log_path.read_text()[-3000:]}") from None


def test_python_m_server_answers_on_the_default_backend(latent_ckpt, tmp_path):
    """No KV-cache flag and no KV variable: the server sizes the CPU cache from the model and says so."""
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc, url = start_server(latent_ckpt, log, log_path)
        try:
            printed = log_path.read_text()
            assert "vLLM CPU KV cache:" in printed and '"cpu_kvcache_space_gib": 1' in printed, printed[-2000:]
            assert httpx.get(url + "/version").json()["backend"] == "vllm"
            client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            r = client.chat.completions.create(model=client.models.list().data[0].id, n=3, max_tokens=24, seed=0,
                                               messages=[{"role": "user", "content": "Make 23 from 3 4 5 2."}])
            assert sorted(c.plan_index for c in r.choices) == [0, 1, 2]
            assert "vllm:num_requests_running" in httpx.get(url + "/metrics").text
            engine_procs = psutil.Process(proc.pid).children(recursive=True)
            assert engine_procs  # vLLM's engine core and worker run as processes of their own
            _assert_kept_off_the_worker_cpus(psutil.Process(proc.pid), engine_procs)
        finally:
            stop(proc)
    # SIGTERM ends the server and, with it, the engine's processes (none left orphaned)
    _, alive = psutil.wait_procs(engine_procs, timeout=30)
    assert not alive, alive


def _assert_kept_off_the_worker_cpus(server: psutil.Process, engine_procs: list[psutil.Process]) -> None:
    """The server runs on the CPUs vLLM's worker leaves free; the engine core beside a one-CPU worker
    (they take turns), on the free CPUs otherwise."""
    worker_cpus = set().union(*(p.cpu_affinity() for p in engine_procs if p.name().startswith("VLLM::Worker")))
    free = os.sched_getaffinity(0) - worker_cpus
    assert worker_cpus and free, (worker_cpus, free)  # vLLM reserves a CPU for its scheduler on >= 2 CPUs
    cores = [p for p in engine_procs if p.name().startswith("VLLM::EngineCor")]
    assert len(cores) == 1
    expected = [(server, free), (cores[0], worker_cpus if len(worker_cpus) == 1 else free)]
    for p, cpus in expected:
        for t in p.threads():
            assert os.sched_getaffinity(t.id) <= cpus, (p.name(), t.id, os.sched_getaffinity(t.id), cpus)


def test_a_dead_engine_makes_health_503_fails_requests_at_once_and_ends_the_server(latent_ckpt, tmp_path):
    """kill -9 of vLLM's engine core while requests are in flight: each in-flight request gets a
    clear 503, /health answers 503 'dead' and new requests a 503 at once for the linger period,
    then the server exits with status 70 (EX_SOFTWARE) so that a supervisor restarts it."""
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        # a 20 s linger: the checks below run well inside it, whatever the machine's speed
        proc, url = start_server(latent_ckpt, log, log_path, "--dead-linger-s", "20")
        try:
            core = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if p.name().startswith("VLLM::EngineCor")]
            assert len(core) == 1
            body = {"messages": [{"role": "user", "content": "Make 23 from 3 4 5 2."}], "n": 8, "max_tokens": 256,
                    "min_tokens": 256}

            def ask(stream: bool = False):
                with httpx.Client(timeout=60) as c:
                    if not stream:
                        return c.post(url + "/v1/chat/completions", json=body)
                    with c.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                        return [line for line in r.iter_lines() if line]

            with ThreadPoolExecutor(4) as pool:
                inflight = [pool.submit(ask, i == 3) for i in range(4)]
                deadline = time.time() + 60
                def accepted():  # decoding or queued
                    return metric(url, "ladi:num_requests_running") + metric(url, "ladi:num_requests_waiting")

                while (accepted() < 4 or metric(url, "ladi:num_requests_running") < 1) and time.time() < deadline:
                    time.sleep(0.05)
                assert accepted() == 4 and metric(url, "ladi:num_requests_running") >= 1
                core[0].kill()  # a process this test's server started
                t_kill = time.time()
                results = [f.result(timeout=60) for f in inflight]
            for r in results[:3]:
                assert r.status_code == 503 and r.json()["error"]["code"] == "backend_dead", r.text
            assert '"backend_dead"' in results[3][-1], results[3][-3:]  # the stream ends with the error
            assert time.time() - t_kill < 15
            health = httpx.get(url + "/health", timeout=5)
            assert health.status_code == 503 and health.json()["status"] == "dead", health.text
            t0 = time.time()
            late = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
            assert late.status_code == 503 and late.json()["error"]["code"] == "backend_dead", late.text
            assert time.time() - t0 < 5
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                stop(proc)
    printed = log_path.read_text()
    assert code == 70, printed[-2000:]
    assert "fatal: " in printed and "exiting with status 70" in printed, printed[-2000:]


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples over all its labels."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(url + "/metrics", timeout=5).text.splitlines()
               if line.startswith((name + " ", name + "{")))


def test_sigterm_under_load_answers_every_accepted_request(latent_ckpt, tmp_path):
    """SIGTERM while streaming and plain requests decode: the server stops taking work, lets those in
    flight finish for its grace period, then ends the rest with a clear 503: none is cut silently."""
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc, url = start_server(latent_ckpt, log, log_path, "--backend", "transformers", "--shutdown-grace-s", "3")
        short = {"messages": [{"role": "user", "content": "Make 23 from 3 4 5 2."}], "n": 2, "max_tokens": 8}
        long = {**short, "n": 16, "max_tokens": 256, "min_tokens": 256}

        def ask(body: dict, stream: bool):
            with httpx.Client(timeout=60) as c:
                if not stream:
                    r = c.post(url + "/v1/chat/completions", json=body)
                    return "plain", r.status_code, r.json()
                with c.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                    return "stream", r.status_code, [line for line in r.iter_lines() if line]

        def accepted() -> float:  # finished, decoding or queued
            return sum(metric(url, m) for m in ("ladi:requests_total", "ladi:num_requests_running",
                                                "ladi:num_requests_waiting"))

        def wait_accepted(n: int) -> None:
            deadline = time.time() + 120
            while time.time() < deadline and accepted() < n:
                time.sleep(0.02)
            assert accepted() >= n

        with ThreadPoolExecutor(12) as pool:
            # six short requests answered before the signal, by construction and whatever the
            # machine's speed; then six long ones (16 x 256 forced tokens) that cannot finish in a
            # 3 s grace, so the drain has work to end
            jobs = [pool.submit(ask, short, i % 3 == 0) for i in range(0, 12, 2)]
            for f in jobs:
                f.result(timeout=120)
            jobs += [pool.submit(ask, long, i % 3 == 0) for i in range(1, 12, 2)]
            # SIGTERM once the server has accepted all 12
            wait_accepted(12)
            assert metric(url, "ladi:num_requests_running") >= 1
            proc.send_signal(signal.SIGTERM)
            # while it drains the server still listens: /health says so, a new request gets a clear 503
            deadline = time.time() + 10
            while (health := httpx.get(url + "/health", timeout=5)).status_code == 200 and time.time() < deadline:
                time.sleep(0.02)
            assert health.status_code == 503 and health.json()["status"] == "draining", health.text
            late = httpx.post(url + "/v1/chat/completions", json=short, timeout=30)
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
            results = [f.result(timeout=60) for f in jobs]
        # uvicorn ends a drained server by re-raising the SIGTERM it caught: the usual "stopped" status
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finished = errored = 0
    for kind, status, body in results:
        if kind == "plain":
            if status == 200:
                assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"]), body
                finished += 1
            else:
                assert status == 503 and body["error"]["code"] == "shutting_down", body
                errored += 1
        elif body[-1] == "data: [DONE]":
            finished += 1
        else:  # ended by an error event
            assert status == 200 and '"shutting_down"' in body[-1], body[-3:]
            errored += 1
    assert finished + errored == len(results)
    assert errored >= 1, "the long requests should outlast a 3 s grace period"
    assert finished >= 1, results


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupt"])
def test_a_checkpoint_the_user_got_wrong_is_one_line_and_exit_2(damage, token_ckpt, tmp_path):
    """A user's error is not a bug: one line on stderr naming what is wrong, status 2, no traceback."""
    import shutil
    import subprocess

    ckpt = tmp_path / "ckpt"
    if damage != "missing":
        shutil.copytree(token_ckpt, ckpt)
        weights = ckpt / "decoder" / "model.safetensors"
        if damage == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        else:
            (ckpt / "ladi.json").write_text("{not json")
    runs = [[sys.executable, "-m", "server", "--checkpoint", str(ckpt)],
            [sys.executable, "-m", "training.rl", "--algo", "grpo", "--init", str(ckpt), "--out", str(tmp_path / "rl"),
             "--preset", "smoke"]]
    for cmd in runs:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=clean_env())
        lines = [x for x in p.stderr.splitlines() if x.strip() and "Warning" not in x and "warn(" not in x]
        assert p.returncode == 2, (cmd, p.stderr[-2000:])
        assert "Traceback" not in p.stderr and len(lines) == 1 and lines[0].startswith("error: checkpoint"), p.stderr
        assert {"missing": "not a directory", "truncated": "model.safetensors: unreadable",
                "corrupt": "not valid JSON"}[damage] in lines[0]
