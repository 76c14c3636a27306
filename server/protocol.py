"""Request and response bodies: the OpenAI shapes plus LaDi's extensions.

Unknown top-level keys are accepted (the OpenAI SDK's `extra_body` merges its keys into the top
level). LaDi's own keys: latent_plans, samples_per_plan, denoising_steps, guidance_scale,
diversity, mode, best_of, verifier, reference; and vLLM's min_tokens. Responses are built from
the models at the end of this file.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Mode = Literal["sample", "best_of_n", "pass_at_k"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class LadiParams(BaseModel):
    """Fields shared by both endpoints. Types are strict (no "3" for 3): a wrong type is a 400."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    min_tokens: int = 0  # vLLM's extension: stop tokens cannot end a text before this many tokens
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # LaDi extensions (through extra_body)
    latent_plans: int | None = None
    samples_per_plan: int | None = None
    denoising_steps: int | None = None
    guidance_scale: float | None = None
    diversity: float | None = None
    mode: Mode = "sample"
    best_of: int | None = None
    verifier: str | None = None
    reference: Any = None

    @field_validator("temperature", "top_p", "guidance_scale", "diversity", mode="before")
    @classmethod
    def _ints_are_floats(cls, v):  # JSON 1 is a fine temperature
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(p.get("text", "") for p in self.content if isinstance(p, dict))
        return self.content or ""


class ChatCompletionRequest(LadiParams):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(LadiParams):
    prompt: str | list[str]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoiceMessage(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str | None
    logprobs: None = None
    # LaDi's annotations, on every choice of both endpoints
    plan_index: int | None = None
    score: float | None = None
    verified: bool | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None
    plan_index: int | None = None
    score: float | None = None
    verified: bool | None = None


class PassAtK(BaseModel):
    samples: int
    correct: int
    pass_at: dict[str, float]  # "1".."k" -> unbiased pass@k


class LadiInfo(BaseModel):
    mode: Mode
    latent_plans: int | None
    samples_per_plan: int
    latent_seconds: float
    decode_seconds: float


class CompletionResponse(BaseModel):
    """Both endpoints' non-streamed body (`object` says which): OpenAI's fields plus `ladi` and, in
    pass_at_k mode, `pass_at_k` (one summary per prompt, a bare summary for one prompt)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    object: Literal["chat.completion", "text_completion"]
    created: int
    model: str
    choices: list[ChatChoice] | list[CompletionChoice]
    usage: Usage
    ladi: LadiInfo
    pass_at_k: PassAtK | list[PassAtK] | None = None

    def body(self) -> dict:
        return self.model_dump(exclude_none=False, exclude={"pass_at_k"} if self.pass_at_k is None else set())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
