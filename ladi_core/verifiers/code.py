"""Code judge: run a completion against unit tests (HumanEval format) in a throw-away sandbox.

The sandbox is a child Python in a temporary directory, in its own process group (so whatever it
forks is killed with it), under CPU, memory and file-size limits, with the network cut: in a fresh
network namespace when `unshare` is allowed, and always by disabling sockets inside the child.
"""
from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import tempfile
from typing import Any

from .base import ZERO, Reward

_FENCE = re.compile(r"```(?:python|py)?\n(.*?)```", re.S)

_PRELUDE = """\
import socket as _s
def _no_net(*a, **k):
    raise OSError("network access is disabled in the sandbox")
_s.socket = _no_net; _s.create_connection = _no_net; _s.socketpair = _no_net
del _s, _no_net
"""


@functools.cache
def _unshare_prefix() -> tuple[str, ...]:
    """`unshare -n` (a namespace with no interfaces) where this machine allows it."""
    try:
        ok = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return ("unshare", "-n") if ok else ()


def extract_code(text: str) -> str:
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def build_program(completion: str, reference: dict) -> str:
    """HumanEval layout: prompt + completion (unless the completion redefines the function) + tests."""
    code = extract_code(completion)
    entry = reference["entry_point"]
    if not re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        code = reference.get("prompt", "") + code
    return f"{_PRELUDE}\n{code}\n\n{reference['test']}\n\ncheck({entry})\n"


class CodeVerifier:
    """reference = {"test": str, "entry_point": str, "prompt"?: str}: a HumanEval problem."""

    name = "code"

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512):
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb

    def extract_answer(self, text: str) -> str | None:
        return extract_code(text).strip() if isinstance(text, str) and text.strip() else None

    def _limits(self) -> None:  # runs in the child before exec
        import resource

        mem = self.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        cpu = int(self.timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def run(self, program: str) -> tuple[bool, str]:
        with tempfile.TemporaryDirectory(prefix="ladi-code-") as tmp:
            path = os.path.join(tmp, "program.py")
            with open(path, "w") as f:
                f.write(program)
            cmd = [*_unshare_prefix(), sys.executable, "-I", "-B", path]
            env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "PYTHONHASHSEED": "0"}
            # Output goes to a file, not a pipe: a forked child holding a pipe open must not
            # keep us waiting past the program's own exit.
            with open(os.path.join(tmp, "stderr"), "w+b") as err:
                proc = subprocess.Popen(
                    cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                    start_new_session=True, preexec_fn=self._limits,
                )
                try:
                    code = proc.wait(timeout=self.timeout_s)
                    err.seek(max(0, os.path.getsize(err.name) - 300))
                    status = "ok" if code == 0 else f"exit {code}: {err.read().decode(errors='replace')}"
                except subprocess.TimeoutExpired:
                    status = "timeout"
                finally:
                    try:  # the whole group: children the program forked die with it
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    proc.wait()
        return status == "ok", status

    def score(self, text: str, reference: Any) -> Reward:
        if not isinstance(text, str) or not text.strip():
            return ZERO
        try:
            program = build_program(text, reference)
        except (KeyError, TypeError):
            return Reward(0.0, 1.0, None, "bad reference")
        try:
            compile(program, "<completion>", "exec")
        except (SyntaxError, ValueError) as err:
            return Reward(0.0, 0.0, None, f"syntax: {err}")
        ok, status = self.run(program)
        return Reward(1.0 if ok else 0.0, 1.0, self.extract_answer(text), status)
