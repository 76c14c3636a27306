"""Generation: plan structure, seeds, batching invariance, and the transformers backend against
transformers' own greedy `generate`."""
import pytest
import torch

from ladi_core.backends import SamplingParams
from ladi_core.codec import with_plans
from ladi_core.generation import generate

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


def test_latent_generation_is_plan_major(latent_reasoner):
    gens = latent_reasoner.generate(["Use 3 4 5 2 to make 23.", "Use 1 2 3 4 to make 10."], plans=3,
                                    samples_per_plan=2, params=SamplingParams(max_tokens=30, seed=0))
    assert len(gens) == 2
    for g in gens:
        assert [c.plan_index for c in g.completions] == [0, 0, 1, 1, 2, 2]
        assert g.plans.shape[0] == 3
        assert all(len(c.decoded.token_ids) <= 30 for c in g.completions)
    assert not torch.equal(gens[0].plans[0], gens[0].plans[1])  # distinct plans


def test_token_level_generation(token_reasoner):
    (g,) = token_reasoner.generate(["Use 3 4 5 2 to make 23."], plans=2, samples_per_plan=3,
                                   params=SamplingParams(max_tokens=30, seed=0))
    assert len(g.completions) == 6 and g.plans is None and all(c.plan_index is None for c in g.completions)


def test_seeds_reproduce_and_differ(latent_reasoner):
    p = ["Use 3 4 5 2 to make 23."]
    def run(seed):
        (g,) = latent_reasoner.generate(p, 4, 2, SamplingParams(max_tokens=30, seed=seed))
        return [c.text for c in g.completions]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_batching_and_padding_do_not_change_greedy_outputs(latent_reasoner, token_reasoner):
    for r in (latent_reasoner, token_reasoner):
        short, long = "Use 1 2 3 4 to make 10.", "Use 9 8 7 6 to make 55. " * 3
        ids = r.prompt_ids([short, long])
        emb = r.prompt_embeds(ids)
        alone = r.backend.generate(emb[:1], 1, GREEDY)[0][0]
        batched = r.backend.generate(emb, 3, GREEDY)[0]
        assert all(d.token_ids == alone.token_ids for d in batched)


def test_backend_matches_transformers_generate(token_reasoner):
    r = token_reasoner
    ids = r.prompt_ids(["Use 3 4 5 2 to make 23."])
    emb = r.prompt_embeds(ids)
    ours = r.backend.generate(emb, 1, GREEDY)[0][0]
    ref = r.backend.model.generate(inputs_embeds=emb[0][None], attention_mask=torch.ones(1, emb[0].shape[0],
                                   dtype=torch.long), max_new_tokens=40, do_sample=False,
                                   eos_token_id=r.tokenizer.eos_token_id, pad_token_id=r.tokenizer.pad_token_id)
    ref_ids = [t for t in ref[0].tolist() if t not in (r.tokenizer.eos_token_id, r.tokenizer.pad_token_id)]
    assert ours.token_ids == ref_ids


def test_prefixes_are_prompt_then_bot_plan_eot_as_the_codec_says(latent_reasoner):
    """`[prompt; bot; adapter(z); eot]`, or the plan alone for a codec whose decoder does not see the
    question: `Reasoner.prefixes` follows the checkpoint's flag (the one prompt -> prefix path)."""
    r = latent_reasoner
    codec = r.checkpoint.codec
    ids = r.prompt_ids(["Use 3 4 5 2 to make 23."])
    z = torch.randn(1, codec.cfg.latent_tokens, codec.cfg.latent_dim)
    prompt = r.prompt_embeds(ids)
    n, plan_len = len(ids[0]), codec.cfg.latent_tokens + 2
    for sees in (True, False):
        (seq,) = with_plans(prompt, codec.plan_embeds(z), sees)
        assert seq.shape == ((n if sees else 0) + plan_len, codec.cfg.hidden_size)
        if sees:
            assert torch.equal(seq[:n], r.embed_tokens(torch.tensor(ids[0])))
        assert torch.equal(seq[-plan_len], codec.adapter.bot) and torch.equal(seq[-1], codec.adapter.eot)
    (served,) = r.prefixes(prompt, z)
    assert torch.equal(served, with_plans(prompt, codec.plan_embeds(z), codec.cfg.decoder_sees_question)[0])
    with pytest.raises(ValueError):
        r.prefixes(r.prompt_embeds(ids * 2), z)


def test_stop_strings_and_convenience_function(latent_ckpt):
    (g,) = generate(latent_ckpt, ["Use 3 4 5 2 to make 23."], plans=2, samples_per_plan=1, max_tokens=40,
                    seed=0, stop=("=",))
    for c in g.completions:
        assert "=" not in c.text


def test_bad_arguments_are_clear_errors(latent_reasoner):
    with pytest.raises(ValueError):
        latent_reasoner.generate(["x"], plans=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
