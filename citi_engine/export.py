"""Export a tuned model as a plain Hugging Face model directory, loadable without citi or peft.

- ``citi``: the UCO components' trained weights replace the base weights; **MOLoRA is dropped**.
  MOLoRA's experts are weighted per token by a router, so they cannot be folded into a fixed
  weight matrix; the exported model therefore carries only the stage-3 (UCO) part of the tuning,
  and most of the tool-calling gain, which lives in the experts, is lost. Serve the adapter
  itself (``citi chat --adapter``, the inference server) to keep it.
- ``lora``: LoRA merged into the base weights (exact).
- ``full``: the tuned weights as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _plain_linear(layer: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` of ``dtype`` with ``layer``'s weights (UCO layers hold fp32 master weights)."""
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      device=layer.weight.device, dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
    return plain


def unload_citi(peft_model) -> nn.Module:
    """The base model with each UCO component's trained copy in place and every MOLoRA layer removed."""
    from peft.utils import ModulesToSaveWrapper

    from citi_engine.molora import MoloraLayer

    base = peft_model.get_base_model()
    dtype = base.get_input_embeddings().weight.dtype
    swaps: list[tuple[str, nn.Module]] = []
    for name, module in base.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[module.active_adapters[0]]
            swaps.append((name, _plain_linear(trained, dtype) if isinstance(trained, nn.Linear) else trained))
        elif isinstance(module, MoloraLayer):
            swaps.append((name, module.get_base_layer()))  # W0 only: the experts cannot be merged
    for name, new in swaps:
        _replace(base, name, new)
    if hasattr(base, "peft_config"):
        del base.peft_config
    return base


def export_model(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base: str | None = None,
    device: str | None = "cpu",
    dtype: str | None = None,
) -> Path:
    """Write the plain model of ``adapter_dir`` (see the module docstring) to ``out_dir``; return ``out_dir``.

    ``out_dir`` gets ``config.json``, ``model.safetensors``, the tokenizer and a README saying what was
    merged and what was dropped.
    """
    from citi_engine.adapter import load_adapter, read_job

    job = read_job(adapter_dir)
    method = job.get("method", "full")
    model, tokenizer = load_adapter(adapter_dir, base=base, device=device, dtype=dtype)
    if method == "citi":
        plain = unload_citi(model)
        note = ("UCO components merged (their trained weights replace the base weights); MOLoRA experts "
                "dropped: they are routed per token and cannot be merged, so most of the tool-calling gain is "
                "not in this model. Serve the adapter directory to keep it.")
    elif method == "lora":
        plain = model.merge_and_unload()
        note = "LoRA merged into the base weights."
    else:
        plain = model
        note = "Fully fine-tuned weights, unchanged."
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        f"# Exported from {Path(adapter_dir).name}\n\n"
        f"Base model `{job.get('base_model', '?')}`, method `{method}`. {note}\n\n"
        "A plain Hugging Face model: `AutoModelForCausalLM.from_pretrained(dir)` loads it without citi or peft.\n"
    )
    (out / "citi_export.json").write_text(json.dumps({"adapter": str(adapter_dir), "method": method,
                                                      "base_model": job.get("base_model"), "note": note}, indent=1))
    return out
