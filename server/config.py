"""Typed server configuration: where the model comes from, how it is served, and every limit."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from ladi_core.backends.vllm_options import VLLMOptions


class Limits(BaseModel):
    """Per-request bounds; anything beyond them is a 400, never a 500 or an out-of-memory worker."""

    max_n: int = Field(16, ge=1)
    max_best_of: int = Field(64, ge=1)
    max_latent_plans: int = Field(64, ge=1)
    max_samples_per_plan: int = Field(16, ge=1)
    max_sequences: int = Field(256, ge=1, description="latent_plans x samples_per_plan (or best_of) per request")
    max_tokens: int = Field(256, ge=1)
    max_prompt_tokens: int = Field(1024, ge=1)
    max_denoising_steps: int = Field(200, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_stop_strings: int = Field(4, ge=0)


class ServerConfig(BaseModel):
    checkpoint: str = "checkpoints/demo-ladi-rl"
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # default: the checkpoint directory's name
    device: str = "cpu"
    limits: Limits = Limits()
    max_queue: int = Field(256, ge=1, description="waiting requests beyond this get 429")
    max_batch_requests: int = Field(32, ge=1, description="requests denoised and decoded together")
    max_batch_sequences: int = Field(1024, ge=1, description="decoder rows in one batch")
    batch_window_ms: float = Field(5.0, ge=0,
                                   description="how long a request waits for company, counted from its arrival")
    default_max_tokens: int = 128
    denoising_steps: int | None = Field(None, ge=1, description=(
        "plan denoising steps when a request names none (default: the checkpoint's sampler)"))
    torch_threads: int | None = Field(None, ge=1, description=(
        "torch intra-op threads in the server process (the latent policy; the transformers decoder). "
        "Default: 1 beside a vLLM engine, whose own threads need the cores; torch's default otherwise"))
    pin_cpus: bool = Field(True, description=(
        "beside a vLLM-CPU engine, run this process on the CPUs the engine's worker leaves free, so "
        "that neither the policy nor the HTTP path takes time from the forward passes"))
    allow_code_execution: bool = Field(False, description=(
        "let requests verify with the `code` verifier: it runs the client's own test code (in a bubblewrap "
        "sandbox); off, such requests get 403"))
    request_timeout_s: float = Field(300.0, gt=0, description=(
        "a request still unanswered after this long gets a 504 and its generation is aborted"))
    shutdown_grace_s: float = Field(30.0, ge=0, description=(
        "on SIGTERM: how long requests in flight may finish before they end with a 503; meanwhile the "
        "server still listens, /health answers 503 'draining' and new requests a 503"))
    dead_linger_s: float = Field(2.0, ge=0, description=(
        "once the backend is dead: how long the server still answers (/health 503 'dead', requests a 503) "
        "before it exits with status 70, so that a probe and a last metrics scrape see why"))
    vllm: VLLMOptions = VLLMOptions()  # engine options for --backend vllm
    log_level: str = "info"

    @model_validator(mode="after")
    def _steps_within_limit(self) -> ServerConfig:
        """The server's own default obeys the limit every request's `denoising_steps` obeys."""
        if self.denoising_steps is not None and self.denoising_steps > self.limits.max_denoising_steps:
            raise ValueError(f"denoising_steps {self.denoising_steps} exceeds max_denoising_steps "
                             f"{self.limits.max_denoising_steps}")
        return self
