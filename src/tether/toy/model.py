"""Tiny Llama models for the toy world, initialized from a seed (nothing is downloaded).

The default (`hidden_size=64`, 2 layers, 4 heads of 16, MLP width 192, untied embeddings) over the 53-token
toy vocabulary has 113,600 parameters: embeddings 2 * 53 * 64 = 6,784; per layer attention 4 * 64 * 64 =
16,384, MLP 3 * 64 * 192 = 36,864, two RMSNorms 128; final norm 64. An SFT step (batch 32, about 20
tokens a row) takes 30-50 ms on one shared CPU core.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from tether.toy.tokenizer import MODEL_MAX_LENGTH


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = MODEL_MAX_LENGTH,
    tie_word_embeddings: bool = False,
    **overrides: Any,
) -> LlamaConfig:
    """A small `LlamaConfig`.

    num_kv_heads: key/value heads (grouped-query attention when < num_heads); default num_heads.
    intermediate_size: MLP width; default 3 * hidden_size.
    overrides: any other `LlamaConfig` field (e.g. `pad_token_id`, `rope_parameters`).
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size if intermediate_size is None else intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads if num_kv_heads is None else num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **overrides,
    )


def build_tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A freshly initialized tiny `LlamaForCausalLM` (fp32, eval mode) for `tokenizer`.

    The vocabulary size and the pad/bos/eos ids come from the tokenizer; `overrides` go to
    `tiny_llama_config`. The same seed gives the same weights; the global torch RNG is left untouched.
    """
    config = tiny_llama_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()
