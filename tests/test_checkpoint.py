"""Checkpoint round-trip, plain-HF loading of decoder/, and clear rejection of broken directories."""
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from ladi_core.backends import SamplingParams
from ladi_core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    make_provenance,
    read_config,
    save_checkpoint,
    set_sampler_default,
)
from ladi_core.decoder import load_decoder
from ladi_core.generation import Reasoner

PROMPTS = ["Use 3 4 5 2 to make 23.", "Use 9 1 1 8 to make 17."]
PARAMS = SamplingParams(temperature=1.0, max_tokens=40, seed=11)


def texts(reasoner):
    return [[c.text for c in g.completions] for g in reasoner.generate(PROMPTS, 3, 2, PARAMS)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["latent", "token"])
def test_round_trip_gives_the_same_outputs(kind, latent_ckpt, token_ckpt, tmp_path):
    src = latent_ckpt if kind == "latent" else token_ckpt
    a = Reasoner.from_checkpoint(src)
    before = texts(a)
    assert before == texts(a)  # seeded: reproducible
    ck = load_checkpoint(src)
    model, tok = load_decoder(ck.decoder_dir)
    dst = save_checkpoint(tmp_path / "copy", model, tok, make_provenance("test", 5), codec=ck.codec, policy=ck.policy)
    b = Reasoner.from_checkpoint(dst)
    assert texts(b) == before
    for p, q in zip(a.backend.model.parameters(), b.backend.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_decoder_dir_loads_with_plain_transformers(latent_ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(latent_ckpt / "decoder")
    model = AutoModelForCausalLM.from_pretrained(latent_ckpt / "decoder")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.hidden_size // model.config.num_attention_heads == 64
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def _copy(src, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def _resave_decoder(d, fn):
    from safetensors.torch import load_file, save_file

    f = d / "decoder" / "model.safetensors"
    state = load_file(f)
    fn(state)
    save_file({k: v.contiguous() for k, v in state.items()}, f)


def _edit_json(path, fn):
    cfg = json.loads((path / "ladi.json").read_text())
    fn(cfg)
    (path / "ladi.json").write_text(json.dumps(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "ladi.json").unlink(), "no ladi.json"),
    (lambda d: (d / "ladi.json").write_text("{not json"), "not valid JSON"),
    (lambda d: _edit_json(d, lambda c: c.update(format_version=99)), "format_version 99"),
    (lambda d: _edit_json(d, lambda c: c.update(kind="hologram")), "malformed"),
    (lambda d: _edit_json(d, lambda c: c["codec"].update(latent_dim=c["codec"]["latent_dim"] * 2)),
     "has shape"),
    (lambda d: _edit_json(d, lambda c: c["policy"].update(layers=c["policy"]["layers"] + 1)), "missing tensor"),
    (lambda d: (d / "policy.safetensors").unlink(), "policy.safetensors is missing"),
    (lambda d: (d / "codec.safetensors").write_bytes(b"\x00" * 64), "codec.safetensors: unreadable"),
    (lambda d: (d / "decoder" / "model.safetensors").rename(d / "decoder" / "pytorch_model.bin"),
     "no .safetensors weights"),
    # the decoder's weights are checked as the codec's and the policy's are: header, names, shapes
    (lambda d: (d / "decoder" / "model.safetensors").write_bytes(b"\x00" * 64), "model.safetensors: unreadable"),
    (lambda d: _resave_decoder(d, lambda s: s.update({k: v[:-1] for k, v in s.items()
                                                      if k.endswith("up_proj.weight")})),
     r"up_proj.weight has shape .*, config.json implies"),
    (lambda d: _resave_decoder(d, lambda s: s.pop("model.norm.weight")), "missing tensor model.norm.weight"),
    (lambda d: _resave_decoder(d, lambda s: s.update(extra=torch.zeros(2))), "unexpected tensor extra"),
])
def test_broken_checkpoints_are_rejected_with_a_clear_message(latent_ckpt, tmp_path, damage, message):
    d = _copy(latent_ckpt, tmp_path)
    damage(d)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(d)


@pytest.mark.slow
def test_all_problems_are_reported_at_once(latent_ckpt, tmp_path):
    d = _copy(latent_ckpt, tmp_path)
    (d / "policy.safetensors").unlink()
    _edit_json(d, lambda c: c["codec"].update(latent_dim=c["codec"]["latent_dim"] + 1))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(d)
    assert "policy.safetensors is missing" in str(err.value) and "has shape" in str(err.value)


@pytest.mark.slow
def test_loading_never_unpickles(latent_ckpt, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    Reasoner.from_checkpoint(latent_ckpt)


def test_the_tokenizer_survives_a_save_and_a_plain_autotokenizer_load(tmp_path):
    """transformers maps model_type qwen2 to its own tokenizer class: ours must load back unchanged."""
    from transformers import AutoTokenizer

    from ladi_core.decoder import DecoderConfig, build_char_tokenizer, build_decoder

    tok = build_char_tokenizer()
    build_decoder(DecoderConfig(num_layers=1, intermediate_size=64), tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nUse 7 3 4 4 to make 13.<|im_end|>\n<|im_start|>assistant\n7*3=21\nanswer: 7*3-4-4 é"
    ids = tok(text, add_special_tokens=False).input_ids
    assert back(text, add_special_tokens=False).input_ids == ids
    assert back.decode(ids) == text
    plain = text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    markers = text.count("<|im_start|>") + text.count("<|im_end|>")
    assert len(ids) == len(plain.encode()) + markers  # one token per byte, one per ChatML marker


def test_a_sampler_default_changes_with_its_evidence_recorded(latent_ckpt, token_ckpt, tmp_path):
    d = _copy(latent_ckpt, tmp_path)
    before = load_checkpoint(d).policy.sampler.steps
    set_sampler_default(d, {"pass@1": {"20": 6.0, "5": 6.0}}, steps=5)
    assert load_checkpoint(d).policy.sampler.steps == 5 != before
    change = read_config(d).provenance.metrics["sampler_changes"][-1]
    assert change["from"] == {"steps": before} and change["to"] == {"steps": 5}
    assert change["evidence"]["pass@1"]["5"] == 6.0
    with pytest.raises(CheckpointError, match="unknown sampler settings"):
        set_sampler_default(d, {}, stepz=5)
    with pytest.raises(CheckpointError, match="token-level"):
        set_sampler_default(_copy(token_ckpt, tmp_path / "t"), {}, steps=5)
    # a setting newer than the file (written before `repulsion` existed) is the policy's, so it is known
    raw = json.loads((d / "ladi.json").read_text())
    raw["sampler"].pop("repulsion", None)
    (d / "ladi.json").write_text(json.dumps(raw))
    assert load_checkpoint(d).policy.sampler.repulsion == "ladir"
    set_sampler_default(d, {"why": "test"}, repulsion="rbf")
    assert load_checkpoint(d).policy.sampler.repulsion == "rbf"


SHIPPED = sorted(p.parent for p in (Path(__file__).resolve().parent.parent / "checkpoints").glob("*/ladi.json"))


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_checkpoint_loads_and_answers_greedily(ckpt):
    """What `make serve` and the README's commands load: each committed checkpoint validates and
    writes a well-formed countdown answer from its own plans (or none), the same twice."""
    from ladi_core.tasks import get_task

    reasoner = Reasoner.from_checkpoint(ckpt)
    qs = get_task("countdown").questions("test", 4, seed=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=96, seed=0)
    first = [g.completions[0].text for g in reasoner.generate([q.prompt for q in qs], 1, 1, greedy)]
    again = [g.completions[0].text for g in reasoner.generate([q.prompt for q in qs], 1, 1, greedy)]
    assert first == again and all(first)
    verifier = get_task("countdown").verifier
    formats = [verifier.score(t, q.reference).format for t, q in zip(first, qs)]
    # at least half well-formed: garbage fails; demo-latent-rl, latent RL's measured collapse (format
    # 63% in results/rl-demo), writes 2 of these 4, every other checkpoint 4
    assert sum(f >= 1.0 for f in formats) >= 2, list(zip(first, formats))
