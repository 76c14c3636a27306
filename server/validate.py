"""One validation step: a parsed request becomes a typed plan of work, or an APIError.

Everything a request can get wrong is checked here, once, before anything reaches the engine:
sampling ranges, the plan/text layout (`layout`), the verifier (`resolve_verifier`) and whether it may run,
prompt length against the model's context, and the LaDi knobs that only a latent policy has.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from ladi_core.backends import SamplingParams
from ladi_core.generation import Reasoner
from ladi_core.policies import POLICY_KINDS
from ladi_core.verifiers import VERIFIERS, Verifier, get_verifier
from ladi_core.verifiers.code import CodeVerifier

from .config import Limits, ServerConfig
from .errors import APIError, BadRequest
from .protocol import ChatCompletionRequest, LadiParams


@dataclass(frozen=True)
class Layout:
    plans: int  # M latent plans (for a token-level checkpoint: 1)
    samples_per_plan: int  # N texts per plan
    choices: int  # n returned

    @property
    def total(self) -> int:
        return self.plans * self.samples_per_plan


def layout(req: LadiParams, latent: bool, limits: Limits, one_plan: bool = False) -> Layout:
    """How many plans and texts a request needs; every bound checked here (400 on violation).
    one_plan: the checkpoint's policy gives each question one plan (its thoughts are deterministic)."""
    n = req.n
    if not 1 <= n <= limits.max_n:
        raise BadRequest(f"n must be between 1 and {limits.max_n}, got {n}", "n")
    if req.best_of is not None and not 1 <= req.best_of <= limits.max_best_of:
        raise BadRequest(f"best_of must be between 1 and {limits.max_best_of}, got {req.best_of}", "best_of")
    for name, value, bound in (("latent_plans", req.latent_plans, limits.max_latent_plans),
                               ("samples_per_plan", req.samples_per_plan, limits.max_samples_per_plan)):
        if value is not None and not 1 <= value <= bound:
            raise BadRequest(f"{name} must be between 1 and {bound}, got {value}", name)
    if req.mode == "best_of_n":
        wanted = req.best_of if req.best_of is not None else max(n, 2 * n)
        if wanted < n:
            raise BadRequest(f"best_of ({wanted}) must be >= n ({n})", "best_of")
    else:
        wanted = n
    if one_plan and req.latent_plans not in (None, 1):
        raise BadRequest("this checkpoint's recurrent policy thinks deterministically, so every plan of a question "
                         "is the same one: leave latent_plans unset (or 1) and ask for n texts", "latent_plans")
    if not latent or one_plan:
        total = wanted if req.samples_per_plan is None else max(wanted, req.samples_per_plan)
        out = Layout(1, total, n)
    elif req.mode == "pass_at_k":
        if req.latent_plans is not None and req.latent_plans != n:
            raise BadRequest("pass_at_k draws k = n candidates from k distinct plans: leave latent_plans "
                             "unset or equal to n", "latent_plans")
        out = Layout(n, 1, n)
    else:
        spp = req.samples_per_plan
        plans = req.latent_plans or (wanted if spp is None else math.ceil(wanted / spp))
        spp = spp or math.ceil(wanted / plans)
        if plans * spp < wanted:
            raise BadRequest(f"latent_plans x samples_per_plan = {plans * spp} < the {wanted} candidates needed",
                             "samples_per_plan")
        out = Layout(plans, spp, n)
    if out.total > limits.max_sequences:
        raise BadRequest(f"this request needs {out.total} sequences; the limit is {limits.max_sequences}",
                         "latent_plans")
    return out


@dataclass(frozen=True)
class WorkPlan:
    """What the engine is asked to do for one request, and how its answer is chosen."""

    params: SamplingParams
    overrides: dict  # latent sampler settings: steps / guidance / diversity / repulsion
    layout: Layout
    rule: str  # best_of_n ranking: auto / verifier / majority / likelihood
    verifier: Verifier | None
    reference: Any
    prompts: list[list[int]]  # one token-id list per prompt
    logprobs: bool = False  # the choices carry their tokens' log-probs (params.top_logprobs alternatives each)


def plan_request(cfg: ServerConfig, reasoner: Reasoner, req: LadiParams, model_name: str) -> WorkPlan:
    if req.model not in (None, model_name):
        raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                       "not_found_error", "model", "model_not_found")
    params = _shaping(req, _sampling(cfg, req), reasoner)
    overrides = _policy_overrides(cfg, reasoner, req)
    lay = layout(req, reasoner.is_latent, cfg.limits, one_plan=reasoner.is_latent and not reasoner.distinct_plans)
    rule, verifier = resolve_verifier(req.verifier, reasoner.checkpoint.config.task)
    if req.mode == "best_of_n" and rule == "majority" and verifier is None:
        raise BadRequest("majority voting needs an answer extractor: name a task verifier in `verifier` "
                         "or serve a checkpoint with a task", "verifier")
    if req.mode == "pass_at_k" and (req.reference is None or verifier is None):
        raise BadRequest("pass_at_k needs a `reference` and a verifier (the checkpoint's task or `verifier`)",
                         "reference")
    if isinstance(verifier, CodeVerifier) and req.reference is not None and not cfg.allow_code_execution:
        raise APIError(403, "code verification runs the client's own test code on this server, which is off "
                            "here; the operator can turn it on with --allow-code-execution (it then runs in a "
                            "bubblewrap sandbox)", "permission_error", "verifier", "code_execution_disabled")
    prompts = [_prompt_ids(cfg, reasoner, t, params.max_tokens) for t in _prompt_texts(reasoner, req)]
    return WorkPlan(params, overrides, lay, rule, verifier, req.reference, prompts, req.logprob_count() is not None)


def _sampling(cfg: ServerConfig, req: LadiParams) -> SamplingParams:
    lim = cfg.limits
    if not 0.0 <= req.temperature <= 2.0:
        raise BadRequest("temperature must be between 0 and 2", "temperature")
    if not 0.0 < req.top_p <= 1.0:
        raise BadRequest("top_p must be in (0, 1]", "top_p")
    max_tokens = req.max_completion_tokens or req.max_tokens or min(cfg.default_max_tokens, lim.max_tokens)
    if not 1 <= max_tokens <= lim.max_tokens:
        raise BadRequest(f"max_tokens must be between 1 and {lim.max_tokens}, got {max_tokens}", "max_tokens")
    if not 0 <= req.min_tokens <= max_tokens:
        raise BadRequest(f"min_tokens must be between 0 and max_tokens ({max_tokens})", "min_tokens")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise BadRequest("seed must be in [0, 2^63)", "seed")
    stop = req.stop_list()
    if len(stop) > lim.max_stop_strings or any(not s or len(s) > 64 for s in stop):
        raise BadRequest(f"stop: at most {lim.max_stop_strings} non-empty strings of up to 64 characters", "stop")
    if req.denoising_steps is not None and not 1 <= req.denoising_steps <= lim.max_denoising_steps:
        raise BadRequest(f"denoising_steps must be between 1 and {lim.max_denoising_steps}", "denoising_steps")
    if req.guidance_scale is not None and not 0.0 <= req.guidance_scale <= 20.0:
        raise BadRequest("guidance_scale must be between 0 and 20", "guidance_scale")
    if req.diversity is not None and not 0.0 <= req.diversity <= 10.0:
        raise BadRequest("diversity must be between 0 and 10", "diversity")
    # token log-probs only where they rank candidates: computing them costs vLLM ~20% throughput
    params = SamplingParams(req.temperature, req.top_p, max_tokens, req.seed, tuple(stop),
                            logprobs=req.mode == "best_of_n", min_tokens=req.min_tokens)
    return params


MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_LOGIT_BIAS = 300  # entries, OpenAI's limit


def _shaping(req: LadiParams, params: SamplingParams, reasoner: Reasoner) -> SamplingParams:
    """The sampling parameters beyond temperature and top-p: penalties, biases, top-k, min-p,
    ignore_eos, log-probs and structured output; each range-checked, and refused when the
    serving backend cannot honour it."""
    for name, lo, hi in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0), ("min_p", 0.0, 1.0)):
        v = getattr(req, name)
        if v is not None and not lo <= v <= hi:
            raise BadRequest(f"{name} must be between {lo:g} and {hi:g}", name)
    if req.repetition_penalty is not None and not 0.0 < req.repetition_penalty <= 10.0:
        raise BadRequest("repetition_penalty must be in (0, 10]", "repetition_penalty")
    if req.top_k is not None and req.top_k < -1:
        raise BadRequest("top_k must be -1 or 0 (all tokens) or a positive count", "top_k")
    vocab = len(reasoner.tokenizer)
    bias = []
    for key, value in (req.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab:
            raise BadRequest(f"logit_bias keys are token ids in [0, {vocab}); got {key!r}", "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise BadRequest("logit_bias values must be between -100 and 100", "logit_bias")
        bias.append((int(key), value))
    if len(bias) > MAX_LOGIT_BIAS:
        raise BadRequest(f"logit_bias takes at most {MAX_LOGIT_BIAS} entries", "logit_bias")
    top = req.logprob_count()
    which = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"{which} must be between 0 and {MAX_TOP_LOGPROBS}", which)
    schema = None
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        schema = json.dumps({"type": "object"})
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise BadRequest("response_format of type json_schema needs a json_schema with a schema", "response_format")
        schema = json.dumps(fmt.json_schema.schema_)
    out = replace(params, top_k=max(0, req.top_k or 0), min_p=req.min_p or 0.0,
                   presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                   repetition_penalty=req.repetition_penalty or 1.0, logit_bias=tuple(bias), ignore_eos=req.ignore_eos,
                   logprobs=params.logprobs or top is not None, top_logprobs=top or 0, json_schema=schema)
    default = SamplingParams()
    for name, why in reasoner.backend.unsupported.items():
        if getattr(out, name) != getattr(default, name):
            param = _REQUEST_FIELD.get(name, name)
            raise BadRequest(f"{param} is not available on the {reasoner.backend.name} backend: {why}", param)
    return out


_REQUEST_FIELD = {"json_schema": "response_format"}  # SamplingParams field -> the request's parameter

def _policy_overrides(cfg: ServerConfig, reasoner: Reasoner, req: LadiParams) -> dict:
    """The plan policy's sampler settings this request sets, as the policy declares them
    (`LatentPolicy.request_fields`); a LaDi sampler parameter the served policy does not take is a
    400 (an assistant policy does not denoise, a token-level checkpoint has no plans). The server's
    own default steps apply only where the policy has steps."""
    policy = reasoner.checkpoint.policy
    takes = policy.request_fields if policy is not None else {}
    what = f"the {policy.kind} policy" if policy is not None else "a token-level checkpoint (it has no latent plans)"
    for field in sampler_parameters():
        if getattr(req, field, None) is not None and field not in takes:
            raise BadRequest(f"{field} does not apply to {what} this server serves", field)
    out = {setting: getattr(req, field) for field, setting in takes.items() if getattr(req, field) is not None}
    if policy is not None and "steps" in policy.overrides and cfg.denoising_steps is not None:
        out.setdefault("steps", cfg.denoising_steps)
    return out


def sampler_parameters() -> set[str]:
    """Every request parameter some registered policy kind reads as a sampler setting."""
    return {field for cls, _, _ in POLICY_KINDS.values() for field in cls.request_fields}


def _prompt_texts(reasoner: Reasoner, req: LadiParams) -> list[str]:
    if isinstance(req, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return [reasoner.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
    texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest("prompt must be a string or a non-empty list of strings", "prompt")
    return texts


def _prompt_ids(cfg: ServerConfig, reasoner: Reasoner, text: str, max_tokens: int) -> list[int]:
    ids = reasoner.tokenizer(text, add_special_tokens=False).input_ids
    lim = cfg.limits.max_prompt_tokens
    if len(ids) > lim:
        raise BadRequest(f"the prompt has {len(ids)} tokens; the limit is {lim}", "messages")
    if not ids:
        raise BadRequest("the prompt is empty", "prompt")
    context = reasoner.backend.max_model_len
    if context is not None:
        plan = reasoner.plan_positions
        if len(ids) + plan + max_tokens > context:
            raise BadRequest(f"prompt ({len(ids)} tokens) + plan ({plan}) + max_tokens ({max_tokens}) exceeds "
                             f"the model's context of {context}", "max_tokens")
    return ids


def resolve_verifier(name: str | None, task: str | None) -> tuple[str, Verifier | None]:
    """(ranking rule, answer verifier). Rules: a task verifier's name, 'majority', 'likelihood'."""
    task_verifier = get_verifier(task) if task in VERIFIERS else None
    if name is None:
        return "auto", task_verifier
    if name in ("majority", "likelihood"):
        return name, task_verifier
    if name in VERIFIERS:
        return "verifier", get_verifier(name)
    raise BadRequest(f"unknown verifier {name!r}: use one of {sorted(VERIFIERS) + ['majority', 'likelihood']}",
                     "verifier")
