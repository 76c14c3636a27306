"""A real Prometheus scrapes a live server; every query of the Grafana dashboard must return data."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from .live import free_port
from .test_server import REF, Q, start

pytestmark = pytest.mark.slow
DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "ladi-dashboard.json"
# the only series a deployment may lack: vLLM's own (the transformers backend has none), the GPU's (CPU)
OPTIONAL_SERIES = ("vllm:", "ladi:gpu_")


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"]
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("request rate", "latency", "first token", "tokens/s", "plans/s", "decode", "queue", "error",
                  "gpu", "vllm engine", "kv-cache"):
        assert topic in titles, topic


@pytest.fixture(scope="module")
def prometheus_bin():
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is not installed: `make test` installs it (apt-get install prometheus)")
    return path


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_every_dashboard_query_returns_data(backend, prometheus_bin, tmp_path, request):
    """On transformers, two live servers behind one Prometheus (two replicas behind a load balancer):
    every panel aggregates over `instance` (no series per instance), and the totals are both
    servers' sum. On vLLM, one server (a second engine would not fit beside the tests)."""
    from contextlib import ExitStack

    from ladi_core.generation import Reasoner

    reasoner = request.getfixturevalue("latent_reasoner" if backend == "transformers" else "vllm_latent_reasoner")
    reasoners = [reasoner] + ([Reasoner.from_checkpoint(reasoner.checkpoint.path)] if backend == "transformers"
                              else [])
    with ExitStack() as stack:
        lives = [stack.enter_context(start(r)) for r in reasoners]
        # a first request warms each engine up, so that the timed load below completes requests
        # throughout several scrapes rather than all at once at its end
        for live in lives:
            httpx.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}],
                                                                "max_tokens": 4}, timeout=120)
        port = free_port()
        targets = ", ".join(f"'{live.url.removeprefix('http://')}'" for live in lives)
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n"
            f"scrape_configs:\n  - job_name: ladi\n    static_configs:\n      - targets: [{targets}]\n")
        proc = subprocess.Popen(
            [prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            api = f"http://127.0.0.1:{port}/api/v1"
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            # traffic across several scrapes: streamed, ranked and failing requests, some concurrent
            # (time to first token is a streaming request's: the others deliver no first token)
            stop = time.time() + 8

            def load(i):
                live = lives[i % len(lives)]
                done = 0
                while time.time() < stop or done < 3:  # at least 3 rounds each, however slow the machine
                    done += 1
                    body = {"messages": [{"role": "user", "content": Q}], "n": 2, "max_tokens": 16,
                            "mode": ["sample", "best_of_n", "pass_at_k"][i % 3], "reference": REF,
                            "stream": i % 3 == 0}
                    httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
                    httpx.post(live.url + "/v1/chat/completions", json={"n": 0}, timeout=30)  # a 400

            threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            # the last scrapes: wait until Prometheus holds the request count the server reports now
            served = sum(float(line.rsplit(" ", 1)[1]) for live in lives
                         for line in httpx.get(live.url + "/metrics").text.splitlines()
                         if line.startswith("ladi:requests_total{"))
            deadline = time.time() + 30
            while time.time() < deadline:
                r = httpx.get(f"{api}/query", params={"query": "sum(ladi:requests_total)"}).json()["data"]["result"]
                if r and float(r[0]["value"][1]) >= served:
                    break
                time.sleep(0.2)
            assert r and float(r[0]["value"][1]) == served, (r, served)
            up = httpx.get(f"{api}/targets").json()["data"]["activeTargets"]
            assert len(up) == len(lives) and all(t["health"] == "up" for t in up), up
            gpu = torch.cuda.is_available()
            for title, expr in dashboard_queries():
                # `or vector(0)` only, and always, on series a deployment may lack; the query without
                # the fallback must find them exactly where this deployment exports them
                inner = expr.removesuffix(" or vector(0)")
                names = re.findall(r"[a-z0-9_]+:[a-z0-9_]+", inner)
                optional = [n for n in names if n.startswith(tuple(OPTIONAL_SERIES))]
                assert names and (inner != expr) == bool(optional), (title, expr)
                exported = not optional or all(
                    (n.startswith("vllm:") and backend == "vllm") or (n.startswith("ladi:gpu_") and gpu)
                    for n in optional)
                q = inner.replace("$__rate_interval", "20s")
                r = httpx.get(f"{api}/query", params={"query": q}).json()
                assert r["status"] == "success", (title, q, r)
                result = r["data"]["result"]
                if not exported:
                    assert not result, f"panel {title!r}: {q} has data this deployment should not export"
                    continue
                assert result, f"no data for panel {title!r}: {q}"
                # one fleet-wide line per target: nothing left split by instance
                assert not any("instance" in s["metric"] for s in result), (title, q, result)
                values = [float(s["value"][1]) for s in result]
                assert any(v == v for v in values), f"only NaN for panel {title!r}: {q}"  # not all NaN
            if backend == "vllm":  # the engine's own series are real, not the `or vector(0)` fallback
                r = httpx.get(f"{api}/query", params={"query": "sum(vllm:generation_tokens_total)"}).json()
                assert r["data"]["result"] and float(r["data"]["result"][0]["value"][1]) > 0, r
        finally:
            proc.terminate()
            proc.wait(timeout=10)
