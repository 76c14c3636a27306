"""The README's main command, `python -m server`, as a user runs it: a subprocess on a checkpoint
with the default backend (`auto`: vLLM, which `make venv` installs), answering the OpenAI SDK."""
from __future__ import annotations

import os
import sys

import httpx
import psutil
import pytest
from openai import OpenAI

from benchmarks.servers import free_port, start, stop

pytestmark = pytest.mark.slow


def test_python_m_server_answers_on_the_default_backend(latent_ckpt, tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        try:
            proc, url = start([sys.executable, "-m", "server", "--checkpoint", str(latent_ckpt), "--port", str(port),
                               "--vllm-cpu-kvcache-space-gib", "1", "--log-level", "warning"], port, timeout=240,
                              log=log)
        except RuntimeError as err:
            raise AssertionError(f"{err}\n{log_path.read_text()[-3000:]}") from None
        try:
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
