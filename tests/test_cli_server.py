"""The README's main command, `python -m server`, as a user runs it: a subprocess on a checkpoint
with the default backend (`auto`: vLLM, which `make venv` installs), answering the OpenAI SDK."""
from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from .live import free_port

pytestmark = pytest.mark.slow


def test_python_m_server_answers_on_the_default_backend(latent_ckpt, tmp_path):
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--checkpoint", str(latent_ckpt), "--port", str(port),
                             "--vllm-cpu-kvcache-space-gib", "1", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the server did not become healthy in 240 s"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert httpx.get(url + "/version").json()["backend"] == "vllm"
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=client.models.list().data[0].id, n=3, max_tokens=24, seed=0,
                                           messages=[{"role": "user", "content": "Make 23 from 3 4 5 2."}])
        assert sorted(c.plan_index for c in r.choices) == [0, 1, 2]
        assert "vllm:num_requests_running" in httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
