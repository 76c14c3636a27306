"""Run an untrusted Python program in a bubblewrap sandbox, or not at all.

What the program gets (bubblewrap, `bwrap`, builds it; nothing here is a hand-written filter):
- its own PID, mount, IPC, UTS and network namespaces: it sees only its own processes, no network
  interface but a loopback of its own, and a root filesystem of its own;
- that filesystem is read-only and holds only the interpreter's paths (/usr, the Python prefix);
  no project directory, no checkpoints, no home; /tmp is a private, size-limited tmpfs;
- an unprivileged uid/gid with no capabilities and no_new_privs (a uid of its own per run, so the
  process-count limit counts this run's processes only);
- rlimits: CPU seconds, address space, file size, no core files, a process count;
- on timeout the whole sandbox dies: killing bwrap kills its PID namespace's init, and with it
  every process the program started.

Where the sandbox cannot be built (no `bwrap`, namespaces forbidden) `SandboxUnavailable` is
raised with the reason: code never runs unconfined.
"""
from __future__ import annotations

import functools
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; `make venv` does it)"


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be built on this machine; the message says why and what to install."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0
    memory_mb: int = 512  # address space per process
    file_mb: int = 16  # largest file the program may write (its stderr included)
    max_procs: int = 16  # processes and threads of this run's uid
    tmpfs_mb: int = 64  # the private /tmp


@dataclass(frozen=True)
class RunResult:
    status: str  # "ok", "timeout", or "exit N: <stderr tail>"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_uids = itertools.count()
_uid_lock = threading.Lock()


def _sandbox_uid() -> int:
    """An unprivileged uid no real account uses, different for concurrent runs of this process."""
    with _uid_lock:
        n = next(_uids)
    return 200_000 + (os.getpid() % 4096) * 1024 + n % 1024


def _interpreter() -> tuple[str, list[str]]:
    """The real interpreter (not a venv's symlink, which lives in the project) and the paths it needs."""
    exe = os.path.realpath(sys.executable)
    prefixes = {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(exe))}
    return exe, sorted(p for p in prefixes if not p.startswith("/usr/") and p != "/usr")


def _root_binds() -> list[str]:
    """/usr read-only, and the merged-/usr symlinks (/bin, /lib, ...) as they are on the host."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def _prefix_binds(prefixes: list[str]) -> list[str]:
    """Each interpreter prefix at its own path (its libpython rpath is absolute), with its missing
    parents made traversable (not readable beyond the mount: nothing else of them exists here)."""
    args, made = [], set()
    for prefix in prefixes:
        parents = list(reversed(Path(prefix).parents))[1:]  # without "/"
        for parent in map(str, parents):
            if parent not in made and not parent.startswith("/usr"):
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        args += ["--ro-bind", prefix, prefix]
    return args


def command(program_path: str, limits: SandboxLimits, argv: list[str] | None = None) -> list[str]:
    """The bwrap command line that runs `program_path` (bound read-only at /sandbox/program.py)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"code verification needs a sandbox, and `bwrap` is not installed: {INSTALL_HINT}")
    exe, prefixes = _interpreter()
    uid = _sandbox_uid()
    root = os.geteuid() == 0
    cmd = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if not root:  # an unprivileged caller gets the namespaces through a user namespace of its own
        cmd += ["--unshare-user", "--uid", str(uid), "--gid", str(uid), "--disable-userns"]
    cmd += [*_root_binds(), *_prefix_binds(prefixes),
            "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(limits.tmpfs_mb * 2**20), "--tmpfs", "/tmp",
            "--perms", "0755", "--dir", "/sandbox", "--ro-bind", program_path, "/sandbox/program.py",
            "--chdir", "/tmp", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "PYTHONHASHSEED", "0", "--hostname", "sandbox",
            "--die-with-parent", "--new-session", "--"]
    if root:  # bwrap ran as root to build the mounts; the program itself runs as nobody in particular
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        cmd += [setpriv, "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
                "--bounding-set", "-all", "--inh-caps", "-all", "--no-new-privs"]
    return [*cmd, exe, "-I", "-B", "/sandbox/program.py", *(argv or [])]


def _set_limits(limits: SandboxLimits) -> None:  # in the child, before exec; inherited by the program
    import resource

    mem = limits.memory_mb * 2**20
    cpu = int(limits.timeout_s) + 1
    fsize = limits.file_mb * 2**20
    for res, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                       (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, limits.max_procs)):
        resource.setrlimit(res, (value, value))


def _run(program: str, limits: SandboxLimits) -> tuple[int | None, str]:
    """(exit code or None on timeout, stderr tail)."""
    with tempfile.TemporaryDirectory(prefix="ladi-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w") as f:
            f.write(program)
        os.chmod(path, 0o644)  # read by the sandbox's uid through its bind mount
        cmd = command(path, limits)
        # output to a file, not a pipe: nothing the program leaves behind can keep us waiting
        with open(os.path.join(tmp, "stderr"), "w+b") as err:
            proc = subprocess.Popen(cmd, cwd=tmp, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                    preexec_fn=functools.partial(_set_limits, limits))
            try:
                code = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                try:  # bwrap and its PID namespace's init; the kernel kills the rest of the namespace
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
            err.seek(max(0, os.path.getsize(err.name) - 300))
            return code, err.read().decode(errors="replace")


@functools.cache
def check() -> None:
    """Build a sandbox once and run a trivial program in it; raise SandboxUnavailable if that fails."""
    code, err = _run("print('ok')\n", SandboxLimits(timeout_s=20))
    if code != 0:
        raise SandboxUnavailable(f"the code sandbox cannot be built here (bwrap exit {code}: {err.strip()[-200:]}); "
                                 "it needs PID, mount and network namespaces (a container may forbid them); "
                                 "code verification is disabled rather than run unconfined")


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Run `program` in the sandbox: "ok" when it exits 0 within the limits."""
    check()
    code, err = _run(program, limits)
    if code is None:
        return RunResult("timeout")
    return RunResult("ok" if code == 0 else f"exit {code}: {err}")
