"""Servers as subprocesses for the benchmarks (and the CLI test): start, wait for /health, stop."""
from __future__ import annotations

import os
import socket
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, timeout: float = 300, log=subprocess.DEVNULL,
          env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Run `cmd` (a server listening on `port`) and return once its /health answers 200.
    env: the server's whole environment (default: ours, with a 2 GiB CPU KV cache for plain vLLM)."""
    if env is None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if log is not subprocess.DEVNULL else log,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{' '.join(cmd)} did not become healthy in {timeout:.0f}s")


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
