"""Method application: put CITI (MOLoRA + UCO), LoRA or full fine-tuning on a base model, choose what
trains in each stage, compute the routing loss, and save / load the result.

- ``citi``: MOLoRA layers on the ``molora`` components, the ``uco`` components fully trainable as peft
  ``modules_to_save``; both in one peft adapter, so one directory restores the whole tuned model.
- ``lora``: peft LoRA on every decoder linear layer (the paper's baseline: r=16, alpha=16).
- ``full``: the plain model, every weight trainable; saved as a whole Hugging Face model.

Every adapter directory also holds ``citi_job.json``: the base model spec, the method, the components
and the job's config, so :func:`load_adapter` needs nothing but the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from citi_engine import ROUTING_BALANCES
from citi_engine.components import list_components
from citi_engine.errors import CitiError
from citi_engine.files import write_json_atomic
from citi_engine.molora import MoloraConfig, MoloraLayer

METHODS = ("citi", "lora", "full")
STAGES = ("router_pretraining", "molora", "uco", "lora", "full")
JOB_FILE = "citi_job.json"
# The call threshold the adapter is served with, and how it was chosen (citi_engine.evaluate.tool_eval).
CALIBRATION_FILE = "calibration.json"


class Fp32MasterLinear(nn.Linear):
    """A fully trained (UCO) linear layer: fp32 master weights, computed in the activations' dtype.

    With a bf16 base model a bf16 weight would round most updates of a 2e-5 learning rate away; this
    keeps the weight in fp32 and casts it to the input dtype in forward (autograd updates the fp32 copy).
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp32MasterLinear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=torch.float32)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.requires_grad_(linear.weight.requires_grad)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type) or x.dtype == self.weight.dtype:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def _keep_uco_in_fp32(model: nn.Module) -> None:
    from peft.utils import ModulesToSaveWrapper

    for wrapper in model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        for adapter, copy in list(wrapper.modules_to_save.items()):
            if isinstance(copy, nn.Linear) and copy.weight.dtype != torch.float32:
                wrapper.modules_to_save[adapter] = Fp32MasterLinear.from_linear(copy)


def apply_method(
    model: nn.Module,
    method: str,
    *,
    molora: Sequence[str] = (),
    uco: Sequence[str] = (),
    num_experts: int = 4,
    rank: int = 8,
    alpha: float = 2.0,
    lora_rank: int = 16,
    lora_alpha: int = 16,
    gate: str = "softmax",
) -> nn.Module:
    """Return ``model`` prepared for ``method`` (``citi``, ``lora`` or ``full``); the base model is modified in place.

    ``citi`` and ``lora`` return a peft model; ``full`` returns the model itself with every weight trainable.
    Call :func:`set_trainable` before each stage to choose what trains.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    if method == "full":
        model.requires_grad_(True)
        return model

    from peft import LoraConfig, get_peft_model

    components = list_components(model)
    if method == "lora":
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=components,
                            task_type="CAUSAL_LM")
        return get_peft_model(model, config)

    molora, uco = list(molora), list(uco)
    if not molora:
        raise ValueError("method 'citi' needs at least one MOLoRA component (molora=[...])")
    unknown = sorted(set(molora + uco) - set(components))
    if unknown:
        raise ValueError(f"not decoder-layer linear projections of this model: {unknown[:5]}; "
                         "use names from citi_engine.components.list_components(model)")
    both = sorted(set(molora) & set(uco))
    if both:
        raise ValueError(f"components cannot be both MOLoRA and UCO: {both}")
    config = MoloraConfig(target_modules=molora, modules_to_save=uco or None, num_experts=num_experts, r=rank,
                          alpha=alpha, gate=gate, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    _keep_uco_in_fp32(peft_model)
    return peft_model


def molora_layers(model: nn.Module) -> list[MoloraLayer]:
    """Every MOLoRA layer of ``model``, in model order."""
    return [m for m in model.modules() if isinstance(m, MoloraLayer)]


def detach_routers(model: nn.Module, on: bool, inputs: bool = False) -> None:
    """Set every MOLoRA layer of ``model`` to pass G(x) to its output without its gradient (``on``), so only the
    routing terms train the routers (``hyperparameters.routing_detach``), and to give its router x without x's
    gradient (``inputs``, ``hyperparameters.routing_detach_input``), so no routing term trains the layers below;
    false for either is the paper's way. The forward's values are the same in every case."""
    for layer in molora_layers(model):
        layer.detach_router = on
        layer.detach_router_input = inputs


def routing_loss(
    model: nn.Module, task_type: torch.Tensor, attention_mask: torch.Tensor, delta: float = 0.95,
    balance: str = "sum",
) -> torch.Tensor:
    """The localized balancing loss, summed over MOLoRA layers, from the router weights of the last forward.

    Per layer: g = router weights summed over each example's real tokens (B x (N+1));
    I = [1+delta, 1-delta, ..., 1-delta] for tool examples (task_type 1), [1-delta, 1+delta, ...] for
    general ones; Z = I * g; L_r = var(Z) / mean(Z)^2 over all B*(N+1) entries. ``var`` is the
    population variance (divide by the number of entries, not one less).

    ``balance="mean"`` (not in the paper) takes g as the mean over each example's tokens instead of the sum, so
    the loss compares how examples route and not how long they are: with sums, a batch of long tool examples
    and short general ones is "balanced" by moving the short ones' weight to their amplified entries, the
    experts, which works against general tokens going to the backbone.

    A layer with the ``sigmoid`` gate balances its experts among themselves: g is each example's total of the
    experts' shares of what the backbone leaves (G(x)[1:] / (1 - G(x)[0]), the softmax among the experts), Z = g
    over B*N entries, no I; the backbone's share is left to the token-level objective
    (:func:`token_routing_loss`), so the two no longer pull on one softmax.
    """
    if balance not in ROUTING_BALANCES:
        raise ValueError(f"balance must be one of {', '.join(ROUTING_BALANCES)}, got {balance!r}")
    total = None
    for gate, probs in _stacked_router_probs(model, "routing_loss"):  # (L, B, T, N+1): L layers at once
        experts_only = gate == "sigmoid"
        if experts_only:  # the softmax among the experts
            probs = probs[..., 1:] / (1.0 - probs[..., :1]).clamp(min=1e-6)
        mask = attention_mask.to(device=probs.device, dtype=probs.dtype)
        g = torch.einsum("lbtn,bt->lbn", probs, mask)  # (L, B, N+1), or (L, B, N) among the experts
        if balance == "mean":
            g = g / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        if experts_only:
            Z = g.flatten(1)
        else:
            # +1 on the backbone neuron and -1 on the experts for tool examples; the opposite for general ones.
            sign = torch.full((g.shape[-1],), -1.0, device=g.device, dtype=g.dtype)
            sign[0] = 1.0
            is_tool = task_type.to(g.device).reshape(-1, 1) == 1
            I = 1.0 + delta * torch.where(is_tool, sign, -sign)  # noqa: E741 (the method page's name)
            Z = (I * g).flatten(1)
        loss = (Z.var(dim=1, unbiased=False) / Z.mean(dim=1).square()).sum()  # each layer's, added up
        total = loss if total is None else total + loss
    return total


def token_routing_loss(model: nn.Module, backbone_target: torch.Tensor,
                       counts: tuple[float, float] | None = None) -> torch.Tensor:
    """The token-level routing objective, from the router weights of the last forward (not in the paper).

    ``backbone_target`` has the shape of the batch's tokens: 1 where the backbone gate G(x)[0] should be
    1 (tokens of general examples: experts off), 0 where it should be 0 (tokens that write a tool call:
    experts on), anything else (-1) where no target applies (prompts of tool examples, padding). Per MOLoRA
    layer: binary cross-entropy of G(x)[0] against the target, averaged over each of the two kinds of token
    apart and the two means added (so neither kind outweighs the other by its count); then the mean over
    layers, so the weight of the term does not grow with the number of layers. ``counts`` gives the
    denominators of the two means (``(backbone, experts)`` tokens of the whole step, so that micro-batches
    and processes add up to the step's value); by default this batch's own counts.
    """
    total = None
    n = 0
    for _gate, probs in _stacked_router_probs(model, "token_routing_loss"):  # (L, B, T, N+1)
        target = backbone_target.to(probs.device).reshape(probs.shape[1:-1])
        p0 = probs[..., 0].clamp(1e-6, 1.0 - 1e-6)  # (L, B, T)
        loss = p0.new_zeros(())
        for k, (value, log_p) in enumerate(((1.0, torch.log(p0)), (0.0, torch.log1p(-p0)))):
            mask = (target == value).to(p0.dtype)
            denominator = mask.sum().clamp(min=1.0) if counts is None else max(float(counts[k]), 1.0)
            loss = loss - (log_p * mask).sum() / denominator  # summed over the layers too
        total = loss if total is None else total + loss
        n += probs.shape[0]
    return total / max(n, 1)


def _stacked_router_probs(model: nn.Module, caller: str) -> list[tuple[str, torch.Tensor]]:
    """G(x) of the last forward of every MOLoRA layer and adapter of ``model``, stacked: ``[(gate, (L, B, T, N+1))]``,
    one entry per gate and shape (a job's layers share both, so one entry).

    The routing terms are then a few operations for all layers at once instead of a few for each: on a GPU a small
    model's training step is bound by the operations it launches (a SmolLM2 job's step: about 15,000 launches, the
    GPU busy 13% of it; bench/results/throughput_h100_s17/jobprofile.md), and per layer the two terms took some
    50 of them, forward and backward, on each of its 105 MOLoRA layers.
    """
    layers = molora_layers(model)
    if not layers:
        raise ValueError(f"{caller} needs a model with MOLoRA layers: apply_method(model, 'citi', ...) first")
    groups: dict[tuple, list[torch.Tensor]] = {}
    for layer in layers:
        for adapter in layer.active_adapters:
            probs = layer.router_probs.get(adapter)
            if probs is None:
                raise RuntimeError(f"{caller} reads the router weights of the last forward: run the model first")
            groups.setdefault((layer.gate[adapter], probs.shape, probs.dtype, probs.device), []).append(probs)
    return [(key[0], torch.stack(probs)) for key, probs in groups.items()]


def backbone_targets(token_kind: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """The targets of :func:`token_routing_loss` for a batch: 1 on every token of a GENERAL example, 0 on the
    positions (flat ``positions``, of kinds ``kinds``) whose next token is part of a tool call, -1 elsewhere."""
    from citi_engine.data.schemas import ExampleKind

    target = torch.full(token_kind.shape, -1.0, device=token_kind.device)
    target[token_kind == int(ExampleKind.GENERAL)] = 1.0
    calls = positions[kinds == int(ExampleKind.TOOL)]
    target.view(-1)[calls] = 0.0
    return target


class AdaptersOff:
    """``with AdaptersOff(model)():`` runs the block on the base model inside a peft model: every adapter layer
    and every ``modules_to_save`` copy (UCO) switched off, then on again, and nothing else touched (peft's own
    ``disable_adapter`` marks every adapter parameter trainable on the way out, which would undo a stage's
    choice of what trains). Cheap enough for every training step: the modules are found once."""

    def __init__(self, model: nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        kinds: tuple[type, ...] = (BaseTunerLayer,)
        try:
            from peft.utils.other import AuxiliaryTrainingWrapper

            kinds = (*kinds, AuxiliaryTrainingWrapper)
        except ImportError:  # pragma: no cover - older peft
            from peft.utils.other import ModulesToSaveWrapper

            kinds = (*kinds, ModulesToSaveWrapper)
        self.modules = [m for m in model.modules() if isinstance(m, kinds)]
        if not self.modules:
            raise TypeError(f"{type(model).__name__} has no adapter layers to switch off")

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        before = [m._disable_adapters for m in self.modules]
        try:
            for m in self.modules:
                m._disable_adapters = True
            yield
        finally:
            for m, b in zip(self.modules, before, strict=True):
                m._disable_adapters = b


class GateMeter:
    """Mean backbone gate G(x)[0] of every MOLoRA layer over chosen tokens, accumulated over forwards.

    After each forward call :meth:`add` with a mask of the tokens to count (same shape as the batch's
    tokens); :meth:`result` gives ``{"mean", "per_layer", "tokens"}``: the mean over layers of each layer's
    mean over the counted tokens, each layer's mean by component name, and how many tokens were counted.
    """

    def __init__(self, model: nn.Module):
        self.layers = [(_component_name(name), m) for name, m in model.named_modules() if isinstance(m, MoloraLayer)]
        self.sums = [0.0] * len(self.layers)
        self.tokens = 0

    def add(self, mask: torch.Tensor) -> None:
        count = None
        for k, (_, layer) in enumerate(self.layers):
            for adapter in layer.active_adapters:
                probs = layer.router_probs.get(adapter)
                if probs is None:
                    continue
                m = mask.to(device=probs.device, dtype=probs.dtype).reshape(probs.shape[:-1])
                self.sums[k] += float((probs[..., 0] * m).sum())
                count = float(m.sum())
        if count is not None:
            self.tokens += int(count)

    def result(self) -> dict[str, Any]:
        if not self.layers or not self.tokens:
            return {"mean": None, "per_layer": {}, "tokens": self.tokens}
        per_layer = {name: s / self.tokens for (name, _), s in zip(self.layers, self.sums, strict=True)}
        return {"mean": sum(per_layer.values()) / len(per_layer), "per_layer": per_layer, "tokens": self.tokens}


def _component_name(module_name: str) -> str:
    # peft nests the base model as base_model.model.<name>; components are named as in the plain model.
    prefix = "base_model.model."
    return module_name[len(prefix):] if module_name.startswith(prefix) else module_name


def _stage_parameters(model: nn.Module, stage: str) -> list[nn.Parameter]:
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if stage == "full":
        return list(model.parameters())
    chosen: list[nn.Parameter] = []
    for module in model.modules():
        if stage in ("router_pretraining", "molora") and isinstance(module, MoloraLayer):
            chosen += module.molora_router.parameters()
            if stage == "molora":
                chosen += [*module.molora_A.parameters(), *module.molora_B.parameters()]
        elif stage == "uco" and isinstance(module, ModulesToSaveWrapper):
            chosen += module.modules_to_save.parameters()
        elif stage == "lora" and isinstance(module, LoraLayer):
            for container in module.adapter_layer_names:
                chosen += getattr(module, container).parameters()
    return chosen


def set_trainable(model: nn.Module, stage: str) -> list[str]:
    """Make exactly the parameters of ``stage`` require grad and freeze every other one; return their names.

    Stages: ``router_pretraining`` (routers), ``molora`` (experts + routers), ``uco`` (the UCO components'
    weights), ``lora`` (LoRA A/B), ``full`` (everything).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}': use one of {', '.join(STAGES)}")
    chosen = {id(p) for p in _stage_parameters(model, stage)}
    if not chosen:
        raise ValueError(f"stage '{stage}' has nothing to train in this model: was apply_method run with the right method?")
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in chosen)
        if id(param) in chosen:
            names.append(name)
    return names


def _method_of(model: nn.Module) -> tuple[str, Any]:
    from peft import PeftModel
    from peft.utils import PeftType

    if not isinstance(model, PeftModel):
        return "full", None
    config = model.peft_config[model.active_adapter]
    if isinstance(config, MoloraConfig):
        return "citi", config
    if config.peft_type == PeftType.LORA:
        return "lora", config
    raise ValueError(f"save_adapter handles MOLoRA and LoRA adapters, not {config.peft_type}")


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from citi_engine import __version__

    return {"citi": __version__, "peft": peft.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__}


@contextlib.contextmanager
def _gguf_marks_dropped(model: nn.Module) -> Iterator[None]:
    """Let transformers save a model that was read from a GGUF file, as the plain weights it now holds.

    transformers dequantises GGUF tensors at load time but keeps the model marked as quantized, and then
    refuses ``save_pretrained``. The weights are ordinary tensors, so the mark is lifted while saving (and
    the saved ``config.json`` carries no quantization section: the directory loads as a plain HF model).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    qconfig = getattr(config, "quantization_config", None)
    method = str(getattr(qconfig, "quant_method", "")).lower()
    if "gguf" not in type(quantizer).__name__.lower() and "gguf" not in method:
        yield
        return
    flags = {name: getattr(model, name) for name in ("hf_quantizer", "is_quantized") if hasattr(model, name)}
    try:
        for name in flags:
            setattr(model, name, None if name == "hf_quantizer" else False)
        if qconfig is not None:
            del config.quantization_config
        yield
    finally:
        for name, value in flags.items():
            setattr(model, name, value)
        if qconfig is not None:
            config.quantization_config = qconfig


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save a tuned model into ``out_dir`` and return it.

    A peft model (citi, lora) becomes ``adapter_config.json`` + ``adapter_model.safetensors``; a plain model
    (full) its whole weights via ``save_pretrained`` (``config.json`` + ``model.safetensors``). Either way
    ``citi_job.json`` records ``format``, ``method``, ``base_model`` (``metadata["model"]``, else the spec
    ``load_model`` gave the model), ``components`` and ``config`` (the ``metadata`` as given). A
    ``README.md`` already in ``out_dir`` (the model card) is left as it was; none is created.
    """
    metadata = dict(metadata or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = metadata.get("model") or getattr(model, "citi_spec", None)
    if not base:
        raise ValueError("save_adapter needs the base model spec: pass metadata={'model': spec} or load the base "
                         "with citi_engine.models.load_model")
    method, config = _method_of(model)
    order = {name: i for i, name in enumerate(list_components(model))}

    def in_order(names: Any) -> list[str]:
        return sorted(names or [], key=lambda n: order.get(n, len(order)))

    if method == "full":
        with _gguf_marks_dropped(model):
            model.save_pretrained(out, safe_serialization=True)
        components: dict[str, Any] = {}
    else:
        # README.md is the job's model card, written by its caller: keep peft's generated card out of it.
        readme = out / "README.md"
        kept = readme.read_bytes() if readme.is_file() else None
        model.save_pretrained(out)
        if kept is not None:
            readme.write_bytes(kept)
        else:
            readme.unlink(missing_ok=True)
        if method == "citi":
            components = {"molora": in_order(config.target_modules), "uco": in_order(config.modules_to_save),
                          "num_experts": config.num_experts, "rank": config.r, "alpha": config.alpha}
        else:
            components = {"lora": in_order(config.target_modules), "rank": config.r, "alpha": config.lora_alpha}
    job = {"format": "full" if method == "full" else "peft", "method": method, "base_model": str(base),
           "components": components, "config": metadata, "versions": _versions()}
    write_json_atomic(out / JOB_FILE, job)
    return out


def read_job(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``citi_job.json`` of an adapter directory, or ``{}`` when it has none."""
    path = Path(adapter_dir) / JOB_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_calibration(adapter_dir: str | os.PathLike, threshold: float, **details: Any) -> Path:
    """Record the call threshold to serve the adapter in ``adapter_dir`` with (and how it was chosen)."""
    return write_json_atomic(Path(adapter_dir) / CALIBRATION_FILE, {"call_threshold": float(threshold), **details})


def read_call_threshold(adapter_dir: str | os.PathLike) -> float:
    """The call threshold recorded for an adapter (0 when none is: plain greedy decoding)."""
    path = Path(adapter_dir) / CALIBRATION_FILE
    return float(json.loads(path.read_text()).get("call_threshold", 0.0)) if path.is_file() else 0.0


def load_adapter(
    adapter_dir: str | os.PathLike,
    base: str | None = None,
    device: str | None = None,
    dtype: Any = None,
    model_dirs: list[str] | None = None,
):
    """Load the base model and the tuned weights of ``adapter_dir``; return ``(model, tokenizer)`` in eval mode.

    The base spec comes from ``citi_job.json`` unless ``base`` is given; ``model_dirs`` restricts where a
    local base may live (as in :func:`citi_engine.models.load_model`).
    """
    from citi_engine.models import _as_dtype, default_device, load_model, load_tokenizer
    from citi_engine.specs import resolve_model_spec

    adapter_dir = Path(adapter_dir)
    has_peft = (adapter_dir / "adapter_config.json").is_file()
    has_full = (adapter_dir / "config.json").is_file()
    if not (has_peft or has_full):
        raise CitiError(f"'{adapter_dir}' holds no adapter (adapter_config.json) or model (config.json): "
                        "pass the directory a fine-tuning job wrote", code="adapter_not_found", param="adapter")
    job = read_job(adapter_dir)
    base = base or job.get("base_model")
    if not base:
        raise CitiError(f"'{adapter_dir}' has no {JOB_FILE} naming its base model: pass base=<model spec>",
                        code="adapter_not_found", param="adapter")
    fmt = job.get("format") or ("peft" if has_peft else "full")
    if fmt == "full":
        from transformers import AutoModelForCausalLM

        device = device or default_device()
        tokenizer = load_tokenizer(resolve_model_spec(base, model_dirs=model_dirs))
        model = AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=_as_dtype(dtype, device),
                                                     trust_remote_code=False)
        model.to(device)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        model.citi_spec = base
        model.eval()
        return model, tokenizer

    from peft import PeftModel  # MOLoRA is registered: this module imports citi_engine.molora

    model, tokenizer = load_model(base, device=device, dtype=dtype, model_dirs=model_dirs)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model, tokenizer
