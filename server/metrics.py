"""Prometheus collectors, named like vLLM's (`vllm:` there, `ladi:` here) so one Grafana habit
serves both. Each server owns its registry: several servers in one process (tests) do not clash."""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("ladi.server")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.backend_registries: list = []  # e.g. the vLLM engine's own `vllm:` collectors
        self.requests = Counter("ladi:requests", "Finished requests by mode and status (HTTP code)",
                                ["mode", "status"], registry=r)
        self.e2e = Histogram("ladi:e2e_request_latency_seconds", "Arrival to last byte", ["mode"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("ladi:time_to_first_token_seconds", "Arrival to the first decoded token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latent_seconds = Histogram("ladi:latent_sampling_seconds", "Denoising the plans of one batch",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.decode_seconds = Histogram("ladi:decode_seconds", "Decoding the texts of one batch",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("ladi:queue_time_seconds", "Arrival to the start of its batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("ladi:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("ladi:generation_tokens", "Tokens generated (all candidates)", registry=r)
        self.plans = Counter("ladi:plans_sampled", "Latent plans denoised", registry=r)
        self.running = Gauge("ladi:num_requests_running", "Requests whose batch is being decoded", registry=r)
        self.waiting = Gauge("ladi:num_requests_waiting", "Requests queued for a batch", registry=r)
        self.batch_requests = Histogram("ladi:batch_size_requests", "Requests per engine batch",
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.gpus = NvmlCollector()
        if self.gpus.available:
            r.register(self.gpus)
        self.info = Gauge("ladi:model_info", "Served model", ["model", "kind", "backend"], registry=r)

    def render(self) -> bytes:
        return b"".join(generate_latest(reg) for reg in [self.registry, *self.backend_registries])


class NvmlCollector:
    """Per-GPU gauges read from NVML at each scrape: the whole device as the driver sees it, so the
    vLLM engine core's memory counts although it lives in another process (torch.cuda in the API
    process sees only its own allocations). On a machine without an NVIDIA driver the gauges are
    absent, not zero, and one log line says why."""

    def __init__(self, nvml=None):
        self.nvml = nvml
        self.available = False
        try:
            if self.nvml is None:
                import pynvml as nvml_module  # nvidia-ml-py

                self.nvml = nvml_module
            self.nvml.nvmlInit()
            self.count = self.nvml.nvmlDeviceGetCount()
            self.available = self.count > 0
            why = "no GPU on this machine" if not self.available else ""
        except Exception as err:  # no driver, no library: nothing to export
            why = f"{type(err).__name__}: {err}"
        if not self.available:
            log.info("GPU gauges (ladi:gpu_*) are not exported: NVML sees no NVIDIA GPU (%s)", why)

    def collect(self):
        n = self.nvml
        util = GaugeMetricFamily("ladi:gpu_utilization_perc", "GPU utilisation over the driver's last sample "
                                 "period (0-100)", labels=["gpu"])
        used = GaugeMetricFamily("ladi:gpu_memory_used_bytes", "Device memory in use by every process on the "
                                 "GPU (the engine core included)", labels=["gpu"])
        total = GaugeMetricFamily("ladi:gpu_memory_total_bytes", "Device memory", labels=["gpu"])
        power = GaugeMetricFamily("ladi:gpu_power_watts", "Power draw", labels=["gpu"])
        for i in range(self.count):
            h = n.nvmlDeviceGetHandleByIndex(i)
            mem = n.nvmlDeviceGetMemoryInfo(h)
            util.add_metric([str(i)], float(n.nvmlDeviceGetUtilizationRates(h).gpu))
            used.add_metric([str(i)], float(mem.used))
            total.add_metric([str(i)], float(mem.total))
            try:
                power.add_metric([str(i)], n.nvmlDeviceGetPowerUsage(h) / 1000.0)  # milliwatts
            except Exception:  # some boards do not report power
                pass
        return [util, used, total, power]

    def describe(self):
        return []  # collected lazily: registering must not read the device
