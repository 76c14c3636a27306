"""The decoder LLM and its tokenizer: a tiny Qwen2 trained here, or any local HF causal LM.

The tiny decoder uses transformers' own `Qwen2ForCausalLM` (the class of real Qwen2.5
checkpoints) with head_dim 64, which vLLM's CPU attention accepts, and a character-level
tokenizer saved in Hugging Face format with a ChatML template. Nothing here is specific to
the tiny model: every function takes whatever `AutoModelForCausalLM` loads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

PAD, EOS, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer():
    """A byte-level tokenizer with no merges: every byte is one token (every ASCII character one
    token), ChatML markers are single special tokens.

    It is a BPE with Qwen's byte-level alphabet on purpose: transformers (5.x) loads any
    `model_type: qwen2` directory with its own Qwen2Tokenizer, which keeps the BPE vocabulary and
    merges but installs the byte-level pre-tokenizer. A tokenizer of that shape loads back exactly
    as it was saved, in transformers and in vLLM.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, EOS, IM_START, IM_END]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=IM_END, additional_special_tokens=[EOS, IM_START],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of a decoder trained from scratch (ignored when a pretrained directory is given)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2  # head_dim = hidden / heads = 64: vLLM's CPU kernel rejects 16
    num_kv_heads: int = 1
    intermediate_size: int = 512
    max_positions: int = 512


def decoder_shape(path: str | Path) -> DecoderConfig:
    """The shape of a local Hugging Face decoder, read from its config.json (no weights loaded), so a
    run prints the decoder it will train rather than the from-scratch default it ignores."""
    import json

    c = json.loads((Path(path) / "config.json").read_text())
    heads = c.get("num_attention_heads", DecoderConfig.num_heads)
    return DecoderConfig(hidden_size=c["hidden_size"], num_layers=c.get("num_hidden_layers", 0), num_heads=heads,
                         num_kv_heads=c.get("num_key_value_heads") or heads,
                         intermediate_size=c.get("intermediate_size", 0),
                         max_positions=c.get("max_position_embeddings", 0))


def build_decoder(cfg: DecoderConfig, tokenizer, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = ((len(tokenizer) + 63) // 64) * 64
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True, rope_theta=10000.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_decoder(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) from a local directory; safetensors only, nothing is unpickled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True).to(device)
    model.eval()
    return model, tokenizer


def chat_prompt(tokenizer, user_message: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
    )


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end a completion: the tokenizer's EOS plus ChatML's end markers when present."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tok] for tok in (IM_END, EOS) if tok in vocab)
    return sorted(i for i in ids if i is not None)
