"""Components: the linear projections inside the decoder layers, and which of them CITI adapts.

A component is named by its full module name in the base model (``model.layers.3.self_attn.k_proj``).
:func:`list_components` lists them in model order; :func:`select_components` picks the MOLoRA set
(highest tool importance M_h) and the UCO set (lowest general importance C_h), never overlapping.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping

from torch import nn

# Canonical order inside one decoder layer; anything else keeps its registration order after these.
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")

# Decoder layers live in a ModuleList called `layers` (Llama, Qwen, Mistral, ...), `h` (GPT-style) or `blocks`.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def _is_linear_component(module: nn.Module) -> bool:
    """True for a plain ``nn.Linear`` and for a peft wrapper around one (tuner layer or modules_to_save)."""
    if isinstance(module, nn.Linear):
        return True
    if hasattr(module, "get_base_layer"):  # a peft tuner layer (LoRA, MOLoRA)
        return isinstance(module.get_base_layer(), nn.Linear)
    return isinstance(getattr(module, "original_module", None), nn.Linear)  # peft's ModulesToSaveWrapper


def list_components(model: nn.Module) -> list[str]:
    """Full module names of every linear projection inside a decoder layer, in model order.

    Order: by layer, then q, k, v, o, gate, up, down (fused ``qkv_proj``/``gate_up_proj`` count as one).
    Embeddings, norms and ``lm_head`` are not components. A peft model is unwrapped to its base model,
    so the names are always those of the base model.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    found: list[tuple[int, int, int, str]] = []
    taken: list[str] = []
    for position, (name, module) in enumerate(model.named_modules()):
        if any(name.startswith(t + ".") for t in taken):
            continue  # inside a component already listed (a peft wrapper's base_layer, say)
        match = _LAYER_RE.search(name)
        if match is None or not _is_linear_component(module):
            continue
        short = name.rsplit(".", 1)[-1]
        rank = MODULE_ORDER.index(short) if short in MODULE_ORDER else len(MODULE_ORDER)
        found.append((int(match.group(1)), rank, position, name))
        taken.append(name)
    return [name for *_, name in sorted(found)]


def component_info(name: str) -> tuple[int, str]:
    """``(layer index, module type)`` of a component name, e.g. ``(3, "k_proj")``."""
    match = _LAYER_RE.search(name)
    if match is None:
        raise ValueError(f"'{name}' is not a decoder-layer component name (expected e.g. 'model.layers.3.self_attn.k_proj')")
    return int(match.group(1)), name.rsplit(".", 1)[-1]


def fraction_to_count(fraction: float, total: int) -> int:
    """How many of ``total`` components a fraction selects: rounded half up, at least 1 when the fraction is > 0."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a component fraction must lie in [0, 1], got {fraction}")
    if fraction == 0.0:
        return 0
    return max(1, min(total, math.floor(fraction * total + 0.5)))


def select_components(
    M: Mapping[str, float],
    C: Mapping[str, float],
    molora_fraction: float,
    uco_fraction: float,
    *,
    selection: str = "importance",
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Pick the MOLoRA set and the UCO set from tool importance ``M`` and general importance ``C``.

    - MOLoRA: the top ``molora_fraction`` of components by M_h.
    - UCO: the bottom ``uco_fraction`` by C_h. A component never sits in both sets: one already chosen
      for MOLoRA is skipped and the next-lowest C_h is taken instead.

    Ties are broken by model order (the order of ``M``'s keys). Both lists come back in model order.
    ``selection="random"`` ignores the scores and draws both sets (same sizes, disjoint) with ``seed``:
    the ablation that shows what the importance ranking is worth.
    """
    names = list(M)
    if set(names) != set(C):
        raise ValueError("M and C must score the same components")
    if not names:
        raise ValueError("there are no components to select from")
    n_molora = fraction_to_count(molora_fraction, len(names))
    n_uco = fraction_to_count(uco_fraction, len(names))
    if n_molora + n_uco > len(names):
        raise ValueError(
            f"molora_fraction={molora_fraction} and uco_fraction={uco_fraction} ask for {n_molora} + {n_uco} "
            f"components, but the model has only {len(names)}: lower one of the fractions"
        )
    order = {name: i for i, name in enumerate(names)}
    if selection == "random":  # the ablation: the same budget on components drawn without looking at scores
        drawn = random.Random(seed).sample(names, n_molora + n_uco)
        molora, uco = set(drawn[:n_molora]), set(drawn[n_molora:])
        return [n for n in names if n in molora], [n for n in names if n in uco]
    if selection != "importance":
        raise ValueError(f"selection must be 'importance' or 'random', got {selection!r}")
    by_tool = sorted(names, key=lambda n: (-M[n], order[n]))
    molora = set(by_tool[:n_molora])
    by_general = sorted(names, key=lambda n: (C[n], order[n]))
    uco = set([n for n in by_general if n not in molora][:n_uco])
    return [n for n in names if n in molora], [n for n in names if n in uco]
