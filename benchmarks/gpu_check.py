"""The GPU check, prepared once so that a session lent a GPU runs it in one call (`make gpu-check`):
the GPU-marked tests (tests/test_gpu.py: SFT and RL steps in bf16 on CUDA, greedy parity of the
two backends where both are installed, the server under load with its NVML gauges), each writing
its figures to results/gpu/<stage>.json, then results/gpu/summary.json with the machine, each
test's outcome and wall time.

    python -m benchmarks.gpu_check [--out results/gpu] [--timeout 480]
    python -m benchmarks.gpu_check --dry-run        (here, on the CPU: the same tests, a few steps each)

It needs only what a bare CUDA PyTorch image has (torch, transformers, pytest, nvidia-ml-py) plus
the small wheels listed in gpu-check-wheels.txt (`make gpu-wheels` fetches them into .whl/; the
README's GPU section gives the one command that installs and runs them on the GPU machine).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("torch", "transformers", "diffusers", "fastapi", "uvicorn", "openai", "prometheus_client", "pynvml",
           "vllm", "pytest")  # what the check imports (vllm is optional: the parity test says so)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/gpu", help="where the JSON files go (default results/gpu)")
    p.add_argument("--dry-run", action="store_true", help="run the check on the CPU at a few steps per stage")
    p.add_argument("--timeout", type=int, default=480, help="seconds for the whole check (default 480: 8 minutes)")
    return p.parse_args(argv)


def machine() -> dict:
    """What the check ran on: the packages it imports (with versions) and the GPU torch sees."""
    import torch

    found = {}
    for name in MODULES:
        if importlib.util.find_spec(name) is None:
            found[name] = None
            continue
        try:
            from importlib.metadata import version

            dist = {"pynvml": "nvidia-ml-py", "prometheus_client": "prometheus-client"}.get(name, name)
            found[name] = version(dist)
        except Exception:  # noqa: BLE001 - a module without distribution metadata
            found[name] = "present"
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
               "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "gpu": gpu, "packages": found}


def outcomes(junit: Path) -> dict[str, dict]:
    """Each test's outcome and time from pytest's JUnit XML."""
    out = {}
    if not junit.is_file():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        status = "passed"
        why = None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status, why = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag], node.get("message")
        out[case.get("name")] = {"outcome": status, "time_s": round(float(case.get("time", 0)), 1),
                                 **({"message": (why or "")[:500]} if why else {})}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    if not args.dry_run and info["gpu"] is None:
        raise SystemExit("gpu_check: torch sees no CUDA device here; on a machine without a GPU run "
                         "`python -m benchmarks.gpu_check --dry-run`")
    missing = [m for m, v in info["packages"].items() if v is None and m not in ("vllm", "pynvml")]
    if missing:
        raise SystemExit(f"gpu_check: missing Python packages: {', '.join(missing)} (install the wheels of "
                         "gpu-check-wheels.txt: see the README's GPU section)")
    print(f"gpu_check: {'dry run on the CPU' if args.dry_run else info['gpu']['name']}; results in {out}", flush=True)
    env = {**os.environ, "LADI_GPU_RESULTS": str(out), "LADI_GPU_DEVICE": "cpu" if args.dry_run else "cuda",
           "LADI_GPU_DRY": "1" if args.dry_run else "0", "PYTHONUNBUFFERED": "1"}
    junit = out / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-v", "-p", "no:cacheprovider",
           f"--junitxml={junit}", f"--timeout={args.timeout}"]
    t0 = time.time()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    summary = {"dry_run": args.dry_run, "returncode": rc, "wall_s": round(time.time() - t0, 1),
               "command": " ".join(["python", "-m", "benchmarks.gpu_check", *(argv or sys.argv[1:])]),
               "machine": info, "tests": outcomes(junit)}
    junit.unlink(missing_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("returncode", "wall_s", "tests")}, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
