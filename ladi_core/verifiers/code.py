"""Code judge: run a completion against unit tests (HumanEval format) in the bubblewrap sandbox
(`sandbox.py`): namespaces of its own, a read-only root with only the interpreter in it, an
unprivileged uid, rlimits, and the whole sandbox killed on timeout. No sandbox, no verdict:
`SandboxUnavailable` is raised rather than running anything unconfined.
"""
from __future__ import annotations

import re
from typing import Any

from .base import ZERO, Reward
from .sandbox import RunResult, SandboxLimits, run_python

_FENCE = re.compile(r"```(?:python|py)?\n(.*?)```", re.S)


def extract_code(text: str) -> str:
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def build_program(completion: str, reference: dict) -> str:
    """HumanEval layout: prompt + completion (unless the completion redefines the function) + tests."""
    code = extract_code(completion)
    entry = reference["entry_point"]
    if not re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        code = reference.get("prompt", "") + code
    return f"{code}\n\n{reference['test']}\n\ncheck({entry})\n"


class CodeVerifier:
    """reference = {"test": str, "entry_point": str, "prompt"?: str}: a HumanEval problem.

    The one verifier that may raise: `SandboxUnavailable` where no sandbox can be built."""

    name = "code"

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512):
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb

    def extract_answer(self, text: str) -> str | None:
        return extract_code(text).strip() if isinstance(text, str) and text.strip() else None

    def limits(self) -> SandboxLimits:
        return SandboxLimits(timeout_s=self.timeout_s, memory_mb=self.memory_mb)

    def run(self, program: str) -> RunResult:
        return run_python(program, self.limits())

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
        result = self.run(program)  # SandboxUnavailable propagates: no sandbox, no verdict
        return Reward(1.0 if result.ok else 0.0, 1.0, self.extract_answer(text), result.status)
