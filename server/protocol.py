"""Request and response bodies: the OpenAI shapes plus LaDi's extensions.

Every top-level key is one of these models' fields, or the request is a 400 naming it
(`reject_unknown`): OpenAI's parameters that this server has no use for (tools, audio, ...) are
refused as unsupported, and a key nobody defines as unknown, as OpenAI's API does. LaDi's own keys
(the OpenAI SDK's `extra_body` merges them into the top level): latent_plans, samples_per_plan,
denoising_steps, guidance_scale, diversity, repulsion, mode, best_of, verifier, reference; and vLLM's
sampling extensions top_k, min_p, min_tokens, repetition_penalty, ignore_eos. Responses are built
from the models at the end of this file.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ladi_core.flow import Repulsion

Mode = Literal["sample", "best_of_n", "pass_at_k"]


# OpenAI's request parameters that no backend here honours: a 400 says so rather than drop them
UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "parallel_tool_calls": "tool calling",
    "functions": "function calling", "function_call": "function calling", "audio": "audio output",
    "modalities": "output modalities other than text", "prediction": "predicted outputs",
    "web_search_options": "web search", "reasoning_effort": "reasoning-effort settings",
    "service_tier": "service tiers", "store": "stored completions", "metadata": "stored completions",
    "echo": "echoing the prompt", "suffix": "suffix insertion", "verbosity": "verbosity settings",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class JSONSchema(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None


class LadiParams(BaseModel):
    """Fields shared by both endpoints. Types are strict (no "3" for 3): a wrong type is a 400."""

    model_config = ConfigDict(extra="allow", strict=True)  # extras are refused by reject_unknown first
    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    min_tokens: int = 0  # vLLM's extension: stop tokens cannot end a text before this many tokens
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    response_format: ResponseFormat | None = None
    # vLLM's sampling extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # LaDi extensions (through extra_body)
    latent_plans: int | None = None
    samples_per_plan: int | None = None
    denoising_steps: int | None = None
    guidance_scale: float | None = None
    diversity: float | None = None
    repulsion: Repulsion | None = None  # the diversity guidance's kernel (flow.repulsion)
    mode: Mode = "sample"
    best_of: int | None = None
    verifier: str | None = None
    reference: Any = None

    @field_validator("temperature", "top_p", "guidance_scale", "diversity", "presence_penalty", "frequency_penalty",
                     "min_p", "repetition_penalty", mode="before")
    @classmethod
    def _ints_are_floats(cls, v):  # JSON 1 is a fine temperature
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _int_biases(cls, v):
        if isinstance(v, dict):
            return {k: float(b) if isinstance(b, int) and not isinstance(b, bool) else b for k, b in v.items()}
        return v

    @classmethod
    def reject_unknown(cls, data: dict) -> None:
        """A 400 for the first top-level key this endpoint does not take (see UNSUPPORTED)."""
        from .errors import BadRequest

        fields = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        extra = [k for k in data if k not in fields]
        for k in extra:
            if k in UNSUPPORTED:
                raise BadRequest(f"{k} is not supported: this server does no {UNSUPPORTED[k]}", k,
                                 code="unsupported_parameter")
        if extra:
            raise BadRequest(f"unknown parameter{'s' if len(extra) > 1 else ''}: {', '.join(sorted(extra))}",
                             extra[0], code="unknown_parameter")

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
    logprobs: bool | None = None  # the chosen tokens' log-probs in each choice
    top_logprobs: int | None = None  # and this many alternatives per token (needs logprobs)

    def logprob_count(self) -> int | None:
        """Alternatives per token when log-probs are asked for, else None."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(LadiParams):
    prompt: str | list[str]
    logprobs: int | None = None  # the completions API: log-probs with this many alternatives per token

    def logprob_count(self) -> int | None:
        return self.logprobs


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
    logprobs: dict[str, Any] | None = None  # {"content": [{token, logprob, bytes, top_logprobs}], "refusal"}
    # LaDi's annotations, on every choice of both endpoints
    plan_index: int | None = None
    score: float | None = None
    verified: bool | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None  # {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
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
    # mean pairwise L2 distance of a prompt's plans (normalised latents), averaged over prompts;
    # None with fewer than two distinct plans (token-level, recurrent, or latent_plans = 1)
    plan_distance: float | None = None


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


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class _ChunkChoice(BaseModel):
    index: int
    logprobs: dict[str, Any] | None = None  # a choice's log-probs arrive whole with its last chunk
    finish_reason: str | None = None
    plan_index: int | None = None  # LaDi's annotations, on a choice's last chunk
    score: float | None = None
    verified: bool | None = None


class ChatChunkChoice(_ChunkChoice):
    delta: ChatDelta


class CompletionChunkChoice(_ChunkChoice):
    text: str = ""


class CompletionChunk(BaseModel):
    """One server-sent event of a stream (both endpoints; `object` says which). Sent with
    `exclude_unset`: a chunk carries the keys it sets, and `logprobs` / `finish_reason` always."""

    id: str
    object: Literal["chat.completion.chunk", "text_completion"]
    created: int
    model: str
    choices: list[ChatChunkChoice] | list[CompletionChunkChoice]
    usage: Usage | None = None  # the last chunk, with stream_options.include_usage
    pass_at_k: PassAtK | None = None  # pass_at_k mode: with a prompt's last choice

    def sse(self) -> str:
        return f"data: {self.model_dump_json(exclude_unset=True)}\n\n"


class ModelInfo(BaseModel):
    kind: str
    policy: str | None
    task: str | None
    backend: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ladi"
    ladi: ModelInfo


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CheckpointInfo(BaseModel):
    path: str
    kind: str
    policy: str | None
    made_by: str | None  # the command that made it (its provenance)
    commit: str | None
    metrics: dict[str, Any] | None


class VersionInfo(BaseModel):
    version: str
    commit: str | None  # the server's own source
    backend: str
    checkpoint: CheckpointInfo


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
