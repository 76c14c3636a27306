"""The server's GPU gauges come from NVML (every process on the device, the vLLM engine core
included): absent, not zero, where NVML sees no GPU; per GPU where it does."""
from __future__ import annotations

import logging
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from server.metrics import NvmlCollector, ServerMetrics


class FakeNvml:
    """NVML's calls as nvidia-ml-py names them, answering for two boards (the driver's view)."""

    def __init__(self):
        self.boards = [dict(util=37, used=5 << 30, total=80 << 30, mw=251_000),
                       dict(util=0, used=1 << 20, total=80 << 30, mw=None)]  # a board without power readings

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.boards)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.boards[i]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=h["used"], total=h["total"], free=h["total"] - h["used"])

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=h["util"], memory=0)

    def nvmlDeviceGetPowerUsage(self, h):
        if h["mw"] is None:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return h["mw"]


def samples(registry) -> dict[tuple[str, str], float]:
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("ladi:gpu_"):
            name, value = line.rsplit(" ", 1)
            out[(name.split("{")[0], name.split('gpu="')[1].split('"')[0])] = float(value)
    return out


def test_on_a_machine_without_a_gpu_the_gauges_are_absent_and_a_line_says_why(caplog):
    class NoDriver(FakeNvml):
        def nvmlInit(self):
            raise OSError("NVML Shared Library Not Found")

    with caplog.at_level(logging.INFO, logger="ladi.server"):
        c = NvmlCollector(NoDriver())
    assert not c.available
    assert any("not exported" in r.message and "NVML Shared Library Not Found" in r.message for r in caplog.records)
    metrics = ServerMetrics()  # this machine: no NVIDIA driver
    assert b"ladi:gpu_" not in metrics.render()


def test_each_gpu_reports_utilisation_memory_of_every_process_and_power():
    registry = CollectorRegistry()
    registry.register(NvmlCollector(FakeNvml()))
    got = samples(registry)
    assert got[("ladi:gpu_utilization_perc", "0")] == 37 and got[("ladi:gpu_utilization_perc", "1")] == 0
    assert got[("ladi:gpu_memory_used_bytes", "0")] == 5 << 30
    assert got[("ladi:gpu_memory_total_bytes", "1")] == 80 << 30
    assert got[("ladi:gpu_power_watts", "0")] == 251.0
    assert ("ladi:gpu_power_watts", "1") not in got  # not reported is absent, not 0
