"""Prometheus collectors, named like vLLM's (`vllm:` there, `ladi:` here) so one Grafana habit
serves both. Each server owns its registry: several servers in one process (tests) do not clash."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.gpu_memory = Gauge("ladi:gpu_memory_used_bytes", "CUDA memory allocated by this process",
                                ["device"], registry=r)
        self.gpu_util = Gauge("ladi:gpu_utilization_perc", "CUDA utilisation (0-100)", ["device"], registry=r)
        self.info = Gauge("ladi:model_info", "Served model", ["model", "kind", "backend"], registry=r)

    def refresh_gpu(self) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        for i in range(torch.cuda.device_count()):
            self.gpu_memory.labels(str(i)).set(torch.cuda.memory_allocated(i))
            try:
                self.gpu_util.labels(str(i)).set(torch.cuda.utilization(i))
            except Exception:  # needs pynvml; memory alone is still worth exporting
                pass

    def render(self) -> bytes:
        self.refresh_gpu()
        return b"".join(generate_latest(reg) for reg in [self.registry, *self.backend_registries])
