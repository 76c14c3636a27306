"""A directory shaped like a real pretrained chat model (Qwen2.5's layout), built from scratch here.

What makes it like the real thing, and unlike the project's own tiny decoder:
- a byte-level BPE **with merges**, trained with `tokenizers`, a vocabulary of thousands, the specials
  after the learned vocabulary (as Qwen's are), `<|im_end|>` ends a turn and `<|endoftext|>` pads;
- Qwen2.5's chat template shape: it injects a default system prompt when the messages have none;
- bf16 safetensors, an untied `lm_head`, `rope_theta` 1e6, a generation_config with both end tokens.

    python -m tests.qwen_like OUT_DIR      # make one by hand, e.g. to try the stages as a user would
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT_SYSTEM = "You are a careful assistant. Think step by step."
# Qwen2.5's template logic (system prompt injected when absent), written for this test model.
QWEN_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus(n: int = 3000) -> list[str]:
    """Text the BPE learns its merges from: Countdown questions and solutions, and prose and code
    (the standard library's own sources and docstrings, so a vocabulary of thousands has words to learn)."""
    import argparse
    import difflib
    import inspect
    import textwrap

    from ladi_core.tasks import get_task

    lines = []
    for q in get_task("countdown").questions("train", n, seed=0):
        lines += [q.prompt, *q.solutions[:2]]
    for module in (argparse, difflib, inspect, textwrap):
        lines += inspect.getsource(module).splitlines()
    return lines


def make_qwen_like(out: str | Path, vocab_size: int = 2048, layers: int = 2, seed: int = 0) -> Path:
    """Write the directory; returns its path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer)
    bpe.add_special_tokens(SPECIALS)  # after the learned vocabulary, as in Qwen's
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = QWEN_STYLE_TEMPLATE
    tok.save_pretrained(out)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=192, intermediate_size=384, num_hidden_layers=layers,
        num_attention_heads=3, num_key_value_heads=1,  # head_dim 64: vLLM's CPU attention accepts it
        max_position_embeddings=1024, rope_theta=1e6, tie_word_embeddings=False,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.eos_token_id, tok.pad_token_id], pad_token_id=tok.pad_token_id, bos_token_id=None)
    model.save_pretrained(out, safe_serialization=True)
    return out


def describe(path: str | Path) -> dict:
    """What makes the directory real-model-shaped, read back from disk (for tests and by hand)."""
    from safetensors import safe_open

    path = Path(path)
    tj = json.loads((path / "tokenizer.json").read_text())
    cfg = json.loads((path / "config.json").read_text())
    weights = next(path.glob("*.safetensors"))
    with safe_open(weights, "pt") as f:
        names = list(f.keys())
        dtype = str(f.get_tensor(names[0]).dtype)
    return {"merges": len(tj["model"]["merges"]), "vocab": len(tj["model"]["vocab"]), "dtype": dtype,
            "untied": "lm_head.weight" in names, "rope_theta": cfg.get("rope_theta")
            or (cfg.get("rope_parameters") or {}).get("rope_theta")}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tests.qwen_like OUT_DIR")
    d = make_qwen_like(sys.argv[1])
    print(d, describe(d))
