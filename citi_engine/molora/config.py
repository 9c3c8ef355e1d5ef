"""MoloraConfig: the settings of one MOLoRA adapter (mixture of LoRA experts with a backbone neuron)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

from citi_engine import ROUTING_GATES

# The member that citi_engine.molora adds to peft's PeftType enum when it is imported.
PEFT_TYPE_NAME = "MOLORA"


@dataclass
class MoloraConfig(PeftConfig):
    """Configuration of a :class:`~citi_engine.molora.model.MoloraModel`.

    Each targeted linear layer W0 becomes ``h = W0 x + sum_i G(x)[i] * (alpha/r) * B_i A_i x`` with
    ``G(x) = softmax(W_r x)`` over N experts plus the backbone neuron G(x)[0]. Modules listed in
    ``modules_to_save`` (the UCO components) are fully trained and saved in the same adapter.
    """

    num_experts: int = field(default=4, metadata={"help": "Number of LoRA experts N per layer (the router has N+1 outputs)."})
    r: int = field(default=8, metadata={"help": "Rank r of every expert."})
    alpha: float = field(
        default=2.0, metadata={"help": "Expert scale numerator: each expert's update is multiplied by alpha/r."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input (the router sees the clean input)."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Full module names of the linear layers to turn into MOLoRA layers (the MOLoRA components), "
            "e.g. ['model.layers.0.self_attn.k_proj'], or a regex matched against the whole name."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules never to adapt."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Full module names trained in full and saved with the adapter (the UCO components). "
            "They must not also be MOLoRA targets."
        },
    )
    gate: str = field(
        default="softmax",
        metadata={
            "help": "How the router's N+1 logits become the weights G(x): 'softmax' over all of them (the paper's) "
            "or 'sigmoid': the backbone's share sigmoid(l_0), the experts sharing the rest by a softmax among "
            "themselves. Adapters saved before this setting existed are 'softmax'."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True (the method): A_i Kaiming-uniform, B_i zero, so the adapter starts as the identity. "
            "False: B_i Kaiming too (tests only: the adapter changes the output from the start)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType(PEFT_TYPE_NAME)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if not self.target_modules:
            raise ValueError("MoloraConfig needs target_modules: the full names of the MOLoRA components")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}")
        if self.r < 1:
            raise ValueError(f"r (the expert rank) must be at least 1, got {self.r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive (experts are scaled by alpha/r), got {self.alpha}")
        if self.gate not in ROUTING_GATES:
            raise ValueError(f"gate must be one of {', '.join(ROUTING_GATES)}, got {self.gate!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list) and self.modules_to_save:
            both = sorted(set(self.target_modules) & set(self.modules_to_save))
            if both:
                raise ValueError(f"a module cannot be both a MOLoRA target and fully trained (modules_to_save): {both}")

    @property
    def scaling(self) -> float:
        """alpha / r, the factor on every expert's update."""
        return self.alpha / self.r
