"""The API contract: every sampling parameter is honoured (shown by its effect on the output) or
refused with a 400 naming it, on both backends, through the real OpenAI SDK and vLLM's own
benchmark client."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from openai import OpenAI

from ladi_core.backends import SamplingParams
from ladi_core.backends.transformers import LogitShaper, sample_next
from training.algos.grpo import token_log_probs

Q = "Use 3 4 5 2 to make 23."


def test_the_logit_shaper_applies_biases_and_penalties_as_vllm_defines_them():
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
                             logit_bias=((3, 10.0),)), SamplingParams()]
    shaper = LogitShaper(params, torch.tensor([1, 1]), vocab=5, device="cpu")
    shaper.update(torch.tensor([1, 4]))
    shaper.update(torch.tensor([1, 2]))
    logits = torch.tensor([[1.0, 2.0, -2.0, 0.5, 0.0], [1.0, 2.0, -2.0, 0.5, 0.0]])
    got = shaper(logits)
    # row 0: token 1 seen twice (positive logit: / 2, then - 0.25 x 2 - 0.5); token 3 biased +10
    assert torch.allclose(got[0], torch.tensor([1.0, 2.0 / 2 - 0.5 - 0.5, -2.0, 10.5, 0.0]))
    assert torch.equal(got[1], logits[1])  # row 1 asked for nothing


def test_top_k_and_min_p_keep_only_the_tokens_they_name():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    gens = [(slice(0, 3), torch.Generator().manual_seed(0))]
    ones = torch.ones(3)
    for _ in range(50):  # top_k 1 and min_p 0.9 leave the best token alone; top_k 2 never the last two
        tok = sample_next(logits, ones, ones, gens, top_k=torch.tensor([1, 2, 0]), min_p=torch.tensor([0.0, 0.0, 0.9]))
        assert tok[0] == 0 and tok[1] in (0, 1) and tok[2] == 0


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def served(request, token_ckpt):
    from .conftest import serving

    with serving(token_ckpt, request.param) as (live, reasoner):
        yield live, reasoner, request.param


def _client(live):
    return OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def _ask(client, **kw):
    return client.chat.completions.create(model=client.models.list().data[0].id,
                                          messages=[{"role": "user", "content": Q}], **kw)


def _post(live, path="/v1/chat/completions", **body):
    base = {"messages": [{"role": "user", "content": Q}]} if "chat" in path else {"prompt": Q}
    return httpx.post(live.url + path, json={**base, "max_tokens": 8, **body}, timeout=60)


@pytest.mark.slow
def test_unknown_and_unsupported_parameters_are_refused_by_name(served):
    live, _, _ = served
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = _post(live, path, bogus_param=1)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == "bogus_param"
        assert err["code"] == "unknown_parameter" and "bogus_param" in err["message"]
    for key, value in (("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
                       ("audio", {"voice": "x"}), ("functions", [])):
        err = _post(live, **{key: value}).json()["error"]
        assert err["param"] == key and err["code"] == "unsupported_parameter", err
    err = _post(live, "/v1/completions", echo=True).json()["error"]
    assert err["param"] == "echo" and err["code"] == "unsupported_parameter"
    for body, param in (({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"presence_penalty": 3}, "presence_penalty"), ({"logit_bias": {"99999": 1}}, "logit_bias"),
                        ({"logit_bias": {"5": 101}}, "logit_bias"), ({"repetition_penalty": 0}, "repetition_penalty"),
                        ({"min_p": 1.5}, "min_p"), ({"top_k": -2}, "top_k")):
        r = _post(live, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def _teacher_forced(reasoner, ids):
    """The decoder's own log-prob of each returned token after the chat prompt (independent of the backend)."""
    model = reasoner.backend.trainable_decoder()
    if model is None:
        from ladi_core.decoder import load_decoder

        model, _ = load_decoder(reasoner.checkpoint.decoder_dir)
    prefix = reasoner.prompt_embeds(reasoner.prompt_ids([Q]))[0].to(next(model.parameters()).device)
    with torch.no_grad():
        logp, _ = token_log_probs(model, [prefix], [ids])
    return logp[0].tolist()


@pytest.mark.slow
def test_logprobs_are_the_models_own_in_openais_shapes(served):
    live, reasoner, _ = served
    client = _client(live)
    r = _ask(client, temperature=0.0, max_tokens=24, seed=1, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    assert "".join(c.token for c in content) == r.choices[0].message.content
    ids = reasoner.tokenizer(r.choices[0].message.content, add_special_tokens=False).input_ids
    want = _teacher_forced(reasoner, ids)
    assert [c.logprob for c in content] == pytest.approx(want, abs=2e-3)
    for c in content:  # greedy: the chosen token is the most likely one, and two alternatives come with it
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.bytes == list(c.token.encode())
    # the completions API: parallel lists, with the text's offsets
    comp = client.completions.create(model=r.model, prompt=Q, max_tokens=12, temperature=0.0, logprobs=3)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == comp.usage.completion_tokens
    assert "".join(lp.tokens) == comp.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) == 3 and max(top.values()) == pytest.approx(v, abs=1e-5)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    # without the parameter, none
    assert _ask(client, temperature=0.0, max_tokens=4).choices[0].logprobs is None


@pytest.mark.slow
def test_streamed_logprobs_and_usage_match_the_unstreamed_answer(served):
    live, _, _ = served
    client = _client(live)
    kw = dict(temperature=0.0, max_tokens=16, seed=2, logprobs=True, top_logprobs=1)
    whole = _ask(client, **kw)
    text, lps, usage = "", [], None
    for chunk in _ask(client, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs is not None:
                lps.extend(c.logprobs.content)
    assert text == whole.choices[0].message.content
    assert [x.logprob for x in lps] == pytest.approx([x.logprob for x in whole.choices[0].logprobs.content])
    assert usage.completion_tokens == whole.usage.completion_tokens == len(lps)


@pytest.mark.slow
def test_ignore_eos_runs_every_text_to_max_tokens(served):
    live, _, _ = served
    client = _client(live)
    short = _ask(client, temperature=0.0, max_tokens=60, seed=0)
    assert short.usage.completion_tokens < 60 and short.choices[0].finish_reason == "stop"  # it ends by itself
    r = _ask(client, n=2, temperature=1.0, max_tokens=60, seed=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2 * 60 and all(c.finish_reason == "length" for c in r.choices)
    # min_tokens: the stop token is masked until then, so the greedy text runs past where it ended
    floor = short.usage.completion_tokens + 5
    m = _ask(client, temperature=0.0, max_tokens=60, seed=0, extra_body={"min_tokens": floor})
    assert m.usage.completion_tokens >= floor and m.choices[0].message.content.startswith(
        short.choices[0].message.content)


@pytest.mark.slow
def test_vllms_benchmark_client_gets_the_tokens_it_asks_for(served):
    """`vllm bench serve --ignore-eos`'s own request function, against this server."""
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncInput, async_request_openai_completions

    live, _, _ = served

    async def one(session):
        inp = RequestFuncInput(prompt=Q, api_url=live.url + "/v1/completions", prompt_len=len(Q), output_len=40,
                               model="m", model_name=_client(live).models.list().data[0].id, ignore_eos=True)
        return await async_request_openai_completions(inp, session)

    async def run():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(one(session) for _ in range(3)))

    outs = asyncio.run(run())
    assert all(o.success for o in outs), [o.error for o in outs]
    assert [o.output_tokens for o in outs] == [40, 40, 40]


@pytest.mark.slow
def test_logit_bias_top_k_min_p_and_penalties_change_the_text(served):
    live, reasoner, backend = served
    client = _client(live)
    greedy = _ask(client, temperature=0.0, max_tokens=24, seed=0).choices[0].message.content
    x = reasoner.tokenizer("x", add_special_tokens=False).input_ids[0]
    forced = _ask(client, temperature=0.0, max_tokens=6, logit_bias={str(x): 100})
    assert forced.choices[0].message.content == "x" * 6
    first = reasoner.tokenizer(greedy, add_special_tokens=False).input_ids[0]
    banned = _ask(client, temperature=0.0, max_tokens=24, logit_bias={str(first): -100}).choices[0].message.content
    assert banned and not banned.startswith(greedy[0])
    # at temperature 1, top_k 1 and min_p 1 leave only the most likely token: the greedy text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = _ask(client, temperature=1.0, max_tokens=24, seed=5, n=2, extra_body=extra)
        assert [c.message.content for c in r.choices] == [greedy, greedy], extra
    # penalties, against a greedy loop written out by hand with vLLM's formulas; a bias that puts
    # "x" just ahead of the model's first choice makes the plain text repeat it, so that each
    # penalty has something to act on
    b = round(_first_margin(reasoner, x) + 0.4, 3)
    bias = {str(x): b}
    plain = _ask(client, temperature=0.0, max_tokens=16, logit_bias=bias).choices[0].message.content
    assert plain.startswith("xx")
    for kw in ({"frequency_penalty": 1.5}, {"presence_penalty": 2.0}, {"repetition_penalty": 3.0}):
        if backend == "vllm" and "repetition_penalty" in kw:  # refused there: see the next test
            continue
        body = {k: v for k, v in kw.items() if k != "repetition_penalty"}
        extra = {k: v for k, v in kw.items() if k == "repetition_penalty"}
        got = _ask(client, temperature=0.0, max_tokens=16, logit_bias=bias, extra_body=extra, **body)
        want = _greedy_by_hand(reasoner, 16, {x: b}, **kw)
        assert got.choices[0].message.content == want != plain, (kw, plain)


@pytest.mark.slow
def test_top_p_max_completion_tokens_and_user_by_value(served):
    live, _, _ = served
    client = _client(live)
    greedy = _ask(client, temperature=0.0, max_tokens=24, seed=0).choices[0].message.content
    # top_p this small keeps only the most likely token: at temperature 1 the greedy text, twice
    r = _ask(client, temperature=1.0, top_p=1e-6, max_tokens=24, seed=5, n=2)
    assert [c.message.content for c in r.choices] == [greedy, greedy]
    free = _ask(client, temperature=1.0, max_tokens=24, seed=5, n=4)
    assert any(c.message.content != greedy for c in free.choices)  # without it the texts vary
    # max_completion_tokens (OpenAI's newer name) wins over max_tokens: exactly 5 tokens, cut by length
    r = _ask(client, temperature=0.0, max_tokens=40, max_completion_tokens=5, seed=0, extra_body={"min_tokens": 5})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    assert greedy.startswith(r.choices[0].message.content)
    # user identifies the caller and changes nothing in the sampling; a non-string is refused by name
    a = _ask(client, max_tokens=16, seed=11, n=2, user="alice")
    b = _ask(client, max_tokens=16, seed=11, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    bad = _post(live, user=5)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "user", bad.text


def _first_margin(reasoner, tok: int) -> float:
    """How far token `tok`'s logit is below the best one at the first step after the prompt."""
    from ladi_core.decoder import load_decoder

    model, _ = load_decoder(reasoner.checkpoint.decoder_dir)
    prefix = reasoner.prompt_embeds(reasoner.prompt_ids([Q]))[0]
    with torch.no_grad():
        logits = model(inputs_embeds=prefix[None]).logits[0, -1]
    return float(logits.max() - logits[tok])


def _greedy_by_hand(reasoner, steps, bias, frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0):
    """Greedy decoding with every pass recomputed from the prompt: logits + bias, then a seen
    token's logit divided (positive) or multiplied (negative) by the repetition penalty, minus the
    frequency penalty per occurrence and the presence penalty once."""
    from ladi_core.decoder import load_decoder, stop_token_ids

    model, _ = load_decoder(reasoner.checkpoint.decoder_dir)
    tok = reasoner.tokenizer
    prefix = reasoner.prompt_embeds(reasoner.prompt_ids([Q]))[0]
    ids: list[int] = []
    for _ in range(steps):
        x = torch.cat([prefix, model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))])[None]
        with torch.no_grad():
            logits = model(inputs_embeds=x).logits[0, -1].float()
        for t, b in bias.items():
            logits[t] += b
        counts = torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=logits.shape[0]).float()
        seen = counts > 0
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty),
                             logits)
        logits = logits - frequency_penalty * counts - presence_penalty * seen.float()
        nxt = int(logits.argmax())
        if nxt in stop_token_ids(tok):
            break
        ids.append(nxt)
    return tok.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_what_a_backend_cannot_honour_is_refused_by_name(served):
    """response_format needs vLLM's grammar engines; repetition_penalty is wrong on vLLM with prompt
    embeddings. Each backend refuses what it cannot do, and does the rest (structured JSON on vLLM)."""
    live, _, backend = served
    client = _client(live)
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    if backend == "transformers":
        for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}):
            r = _post(live, response_format=fmt)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "response_format" and "transformers backend" in err["message"]
        assert _post(live, response_format={"type": "text"}).status_code == 200
        assert _post(live, repetition_penalty=1.5).status_code == 200
        return
    # vLLM's repetition penalty reads the prompt's token ids, which a prompt sent as embeddings lacks
    r = _post(live, repetition_penalty=1.5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty"
    assert "vllm backend" in r.json()["error"]["message"]
    assert _post(live, repetition_penalty=1.0).status_code == 200  # vllm bench serve sends 1.0: no-op
    r = _ask(client, temperature=1.0, max_tokens=64, seed=0, n=2,
             response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    for c in r.choices:
        if c.finish_reason == "stop":  # a text cut by max_tokens is a prefix of a valid one
            doc = json.loads(c.message.content)
            assert set(doc) == {"answer"} and isinstance(doc["answer"], int)
        else:
            assert c.message.content.startswith("{")
    plain = _ask(client, temperature=0.0, max_tokens=64).choices[0].message.content
    assert not plain.startswith("{")  # without the grammar this model writes countdown steps
    obj = _ask(client, temperature=0.0, max_tokens=64, response_format={"type": "json_object"}).choices[0]
    assert obj.message.content.lstrip().startswith("{")
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content), dict)


def test_the_readmes_parameter_tables_match_the_request_models():
    """Every accepted parameter is in the README's tables, and nothing there is not accepted."""
    import re
    from pathlib import Path

    from server.protocol import UNSUPPORTED, ChatCompletionRequest, CompletionRequest

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Parameters"):readme.index("### Modes")]
    documented = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            documented |= set(re.findall(r"`([a-z_.]+)`", first_cell))
    documented = {d.split(".")[0] for d in documented}  # stream_options.include_usage -> stream_options
    accepted = set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields)
    assert documented == accepted, (sorted(documented - accepted), sorted(accepted - documented))
    assert all(f"`{k}`" in section for k in UNSUPPORTED)
