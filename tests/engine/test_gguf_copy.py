"""A GGUF model is read from its file once and from a plain copy under the cache directory after that: the copy
holds the GGUF's numbers, later loads do not parse the GGUF, a changed file gets a new copy, and a cache that
cannot be written only costs speed."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from citi_engine import DEFAULT_MODEL, models
from citi_engine.specs import ResolvedSpec, resolve_model_spec


@pytest.mark.smollm2
def test_the_built_in_model_is_read_from_its_plain_copy_which_holds_the_ggufs_numbers(monkeypatch):
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from gguf.quants import dequantize

    models.load_model(DEFAULT_MODEL, device="cpu")  # makes the copy if no earlier load did
    resolved = resolve_model_spec(DEFAULT_MODEL)
    copy = models._plain_copy(resolved)
    assert (copy / "float32" / "config.json").is_file() and (copy / "tokenizer" / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((copy / "float32" / "config.json").read_text())  # plain weights

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed although its plain copy exists")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
    models._TOKENIZERS.clear()
    model, tokenizer = models.load_model(DEFAULT_MODEL, device="cpu")
    assert model.name_or_path == resolved.path  # recorded as the GGUF's (peft writes it into adapter configs)
    assert tokenizer.pad_token is not None and tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True).endswith("assistant\n")

    # the copy's weights are the GGUF's dequantised tensors (q and k are permuted in GGUF files: not compared)
    reader = gguf.GGUFReader(str(Path(resolved.path) / resolved.gguf_file))
    tensors = {t.name: t for t in reader.tensors}
    pairs = {"token_embd.weight": model.model.embed_tokens.weight, "blk.3.ffn_down.weight":
             model.model.layers[3].mlp.down_proj.weight, "blk.7.attn_v.weight": model.model.layers[7].self_attn.v_proj.weight,
             "blk.0.attn_norm.weight": model.model.layers[0].input_layernorm.weight}
    for name, weight in pairs.items():
        t = tensors[name]
        expected = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type))).reshape(weight.shape)
        assert torch.equal(weight.detach(), expected.to(weight.dtype)), name


def test_a_changed_gguf_file_gets_a_new_copy_and_the_cache_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("CITI_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF one")
    resolved = ResolvedSpec(spec=str(tmp_path / "m.gguf"), kind="gguf", path=str(tmp_path), gguf_file="m.gguf")
    first = models._plain_copy(resolved)
    assert first.parent == tmp_path / "cache" / "gguf-plain"
    (tmp_path / "m.gguf").write_bytes(b"GGUF, two")
    os.utime(tmp_path / "m.gguf", ns=(1, 1))
    assert models._plain_copy(resolved) != first
    monkeypatch.setenv("CITI_GGUF_CACHE", "0")
    assert models._plain_copy(resolved) is None
    plain_dir = ResolvedSpec(spec=str(tmp_path), kind="hf_dir", path=str(tmp_path))
    monkeypatch.delenv("CITI_GGUF_CACHE")
    assert models._plain_copy(plain_dir) is None  # a Hugging Face directory needs no copy


def test_a_copy_that_cannot_be_written_is_warned_about_and_leaves_nothing_half_written(tmp_path, caplog):
    target = tmp_path / "copies" / "float32"

    def full_disk(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with caplog.at_level(logging.WARNING, logger="citi_engine.models"):
        models._keep_plain_copy(target, full_disk)
    assert not target.exists() and list((tmp_path / "copies").iterdir()) == []
    assert "read from the GGUF file each time" in caplog.text and "No space left" in caplog.text

    models._keep_plain_copy(target, lambda d: (d / "config.json").write_text("{}"))
    assert (target / "config.json").read_text() == "{}"
    models._keep_plain_copy(target, lambda d: (d / "config.json").write_text("{} second"))  # another process's
    assert (target / "config.json").read_text() == "{}" and len(list((tmp_path / "copies").iterdir())) == 1
