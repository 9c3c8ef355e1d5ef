"""MoloraModel: finds the MOLoRA target layers of a base model and swaps in :class:`MoloraLinear` layers."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import MoloraConfig
from .layer import MoloraLayer, MoloraLinear


class MoloraModel(BaseTuner):
    """The peft tuner of the MOLoRA method (use through ``peft.get_peft_model`` with a :class:`MoloraConfig`).

    Targets are given explicitly (the components chosen by importance); there is no per-architecture default.
    """

    prefix: str = "molora_"
    tuner_layer_cls = MoloraLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: MoloraConfig, model_config: dict) -> MoloraConfig:
        if not peft_config.target_modules:
            raise ValueError("MOLoRA has no default targets: set target_modules to the MOLoRA components' names")
        return peft_config

    def _create_and_replace(
        self,
        peft_config: MoloraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, MoloraLinear):
            target.update_layer(adapter_name, peft_config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MOLoRA can only adapt nn.Linear layers; '{current_key}' is a {type(base).__name__}")
        new_module = MoloraLinear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trained
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "MOLoRA cannot be merged into the base weights: its experts are weighted by an input-dependent router"
        )

    def molora_layers(self) -> list[tuple[str, MoloraLayer]]:
        """``(module name, layer)`` of every MOLoRA layer, in model order."""
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, MoloraLayer)]
