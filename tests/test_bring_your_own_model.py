"""Bring your own model: a directory shaped like a real pretrained chat model (tests/qwen_like.py: a
byte-level BPE with merges and thousands of tokens, a template that injects a default system prompt,
bf16 safetensors, an untied head, rope_theta 1e6) goes through every stage at smoke size, and the
server serves the result on both backends through the OpenAI SDK, with the model's own tokenizer
and template kept all the way."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from openai import OpenAI

from .qwen_like import DEFAULT_SYSTEM, describe, make_qwen_like

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the fixture trains every stage (~4 min alone)
Q = "Use 3 4 5 2 to make 23."


@pytest.fixture(scope="module")
def byo(tmp_path_factory) -> dict[str, Path]:
    """Every stage, in the order a user runs them, from one Qwen-like directory. LADI_BYO_DIR (a
    developer's shortcut like LADI_SMOKE_DIR, never set in CI) reuses the stages kept there."""
    from training import assistant_sft, coconut_sft, prior_rollout, rl, sft, writer

    keep = os.environ.get("LADI_BYO_DIR")
    root = Path(keep) if keep else tmp_path_factory.mktemp("byo")
    if keep and (root / "rl-coconut-grpo" / "ladi.json").is_file():
        kept = {n: root / n for n in ("model", "latent", "writer", "s2", "dlr-sft", "coconut", "rl-ladi", "rl-grpo",
                                      "rl-dlr", "rl-coconut-grpo")}
        return {**kept, "token": root / "latent-token"}
    d = {"model": make_qwen_like(root / "model")}
    d["latent"] = sft.main(["--task", "countdown", "--preset", "smoke", "--out", str(root / "latent"), "--seed",
                            "0", "--decoder-init", str(d["model"])])
    d["token"] = root / "latent-token"
    writer.main(["--init", str(d["latent"]), "--out", str(root / "writer"), "--decoder-from", str(d["token"]),
                 "--preset", "smoke", "--seed", "0"])
    d["writer"] = root / "writer"
    prior_rollout.main(["--init", str(d["writer"]), "--out", str(root / "s2"), "--preset", "smoke", "--seed", "0"])
    d["s2"] = root / "s2"
    assistant_sft.main(["--init", str(d["writer"]), "--out", str(root / "dlr-sft"), "--preset", "smoke"])
    d["dlr-sft"] = root / "dlr-sft"
    coconut_sft.main(["--init", str(d["token"]), "--out", str(root / "coconut"), "--preset", "smoke"])
    d["coconut"] = root / "coconut"
    for algo, init in (("ladi", "s2"), ("grpo", "token"), ("dlr", "dlr-sft"), ("coconut-grpo", "coconut")):
        extra = ["--text-policy-coef", "1"] if algo == "ladi" else []
        rl.main(["--algo", algo, "--init", str(d[init]), "--out", str(root / f"rl-{algo}"), "--task", "countdown",
                 "--preset", "smoke", "--seed", "0", *extra])
        d[f"rl-{algo}"] = root / f"rl-{algo}"
    return d


def test_the_directory_is_shaped_like_a_real_chat_model(byo):
    shape = describe(byo["model"])
    assert shape["merges"] > 1000 and shape["vocab"] >= 2000
    assert shape["dtype"] == "torch.bfloat16" and shape["untied"] and shape["rope_theta"] == 1e6
    cfg = json.loads((byo["model"] / "config.json").read_text())
    assert cfg["hidden_size"] != 128  # unlike the project's own decoder: the codec must size itself from it


def test_the_sft_run_records_the_decoder_it_trained_and_the_codec_sized_to_it(byo):
    from ladi_core.checkpoint import read_config

    made = read_config(byo["latent"]).provenance.config
    hidden = json.loads((byo["model"] / "config.json").read_text())["hidden_size"]
    assert made["decoder"]["hidden_size"] == hidden and made["decoder"]["num_layers"] == 2
    assert made["codec"]["hidden_size"] == hidden and made["policy"]["hidden_size"] == hidden


STAGES = ["latent", "token", "writer", "s2", "dlr-sft", "coconut", "rl-ladi", "rl-grpo", "rl-dlr", "rl-coconut-grpo"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_keeps_the_models_tokenizer_template_and_shape(byo, stage):
    from transformers import AutoTokenizer

    from ladi_core.checkpoint import load_checkpoint

    ck = load_checkpoint(byo[stage])
    theirs, ours = AutoTokenizer.from_pretrained(byo["model"]), AutoTokenizer.from_pretrained(ck.decoder_dir)
    assert json.loads((ck.decoder_dir / "tokenizer.json").read_text())["model"]["merges"] == \
        json.loads((byo["model"] / "tokenizer.json").read_text())["model"]["merges"]
    msgs = [{"role": "user", "content": Q}]
    text = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert DEFAULT_SYSTEM in text and ours(text).input_ids == theirs(text).input_ids
    assert (ours.eos_token, ours.pad_token) == ("<|im_end|>", "<|endoftext|>")
    cfg = json.loads((ck.decoder_dir / "config.json").read_text())
    assert not cfg["tie_word_embeddings"]
    hidden = json.loads((byo["model"] / "config.json").read_text())["hidden_size"]
    if ck.codec is not None:
        assert ck.codec.cfg.hidden_size == hidden  # the codec and the policy sized from the decoder


def test_training_eval_reads_every_rl_result(byo, tmp_path):
    from training import eval as ev

    runs = ["rl-ladi", "rl-grpo", "rl-dlr", "rl-coconut-grpo"]
    res = ev.main([a for r in runs for a in ("--checkpoint", str(byo[r]))]
                  + ["--task", "countdown", "--problems", "3", "--k", "1,2", "--out", str(tmp_path), "--max-tokens",
                     "24", "--diagnostic-questions", "2", "--probe-questions", "2"])
    assert set(res) == set(runs)
    for r in res.values():
        assert r["questions"] == 3 and 0 <= r["pass@1"] <= r["pass@2"] <= 1 and r["tokens"] > 0


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_the_server_serves_it_through_the_sdk_counting_the_models_own_prompt(byo, backend):
    from transformers import AutoTokenizer

    from .conftest import serving

    tok = AutoTokenizer.from_pretrained(byo["model"])
    msgs = [{"role": "user", "content": Q}]
    prompt_tokens = len(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False))
    for stage in ("rl-ladi", "rl-grpo"):
        with serving(byo[stage], backend) as (live, _):
            client = OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
            for n in (1, 3):
                r = client.chat.completions.create(model=byo[stage].name, messages=msgs, n=n, max_tokens=16, seed=1)
                assert len(r.choices) == n and all(c.message.content is not None for c in r.choices)
                assert r.usage.prompt_tokens == prompt_tokens, (stage, n)  # once per request, whatever n
                assert r.usage.completion_tokens > 0
            c = client.completions.create(model=byo[stage].name, prompt="Use 1 2 3 4 to make 24.", max_tokens=8)
            assert c.usage.prompt_tokens == len(tok("Use 1 2 3 4 to make 24.").input_ids)
