"""bench/step_ops.py's operation counter, and what it was built to show: the routing terms of a CITI step cost the
same few operations however many MOLoRA layers the model has."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import step_ops  # noqa: E402

from citi_engine.adapter import routing_loss, token_routing_loss  # noqa: E402
from citi_engine.molora import MoloraConfig, MoloraLinear  # noqa: E402


class Stack(nn.Module):
    def __init__(self, layers: int, gate: str = "softmax"):
        super().__init__()
        torch.manual_seed(0)
        config = MoloraConfig(target_modules=["x"], num_experts=4, r=2, alpha=4.0, gate=gate)
        self.layers = nn.ModuleList(MoloraLinear(nn.Linear(8, 8, bias=False), "default", config)
                                    for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def counted(fn, part: str = "micro") -> dict:
    with step_ops.OpCounter() as counter:
        counter.part = part
        fn()
    return dict(counter.counts)


def test_operations_are_counted_by_module_forward_teacher_and_backward_node_and_views_are_not():
    model = Stack(2)
    x = torch.randn(3, 8)
    assert counted(lambda: x.view(24).t()) == {}
    forward = counted(lambda: model(x).sum())
    assert forward["forward/MoloraLinear"] > 0 and forward["forward/Linear"] == 2  # the two base matmuls
    assert forward["loss"] == 1  # the sum, outside every module
    with_backward = counted(lambda: model(x).sum().backward())
    backward = {key: n for key, n in with_backward.items() if key.startswith("backward/")}
    assert "backward/MmBackward0" in backward
    assert sum(with_backward.values()) - sum(backward.values()) == sum(forward.values()) + 1  # + the seed gradient
    with torch.no_grad():
        teacher = counted(lambda: model(x))
    assert set(teacher) == {"teacher forward/MoloraLinear", "teacher forward/Linear"}
    assert counted(lambda: torch.ones(2) + 1, part="optimizer") == {"optimizer": 2}


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_the_routing_terms_take_as_many_operations_for_twelve_layers_as_for_three(gate):
    def terms_ops(layers: int) -> int:
        model = Stack(layers, gate)
        x = torch.randn(2, 5, 8)
        model(x)
        mask = torch.ones(2, 5)
        target = torch.tensor([[-1.0, 0.0, 0.0, -1.0, -1.0], [1.0] * 5])
        ops = counted(lambda: (routing_loss(model, torch.tensor([1, 0]), mask, balance="mean")
                               + token_routing_loss(model, target, counts=(5.0, 2.0))))
        return sum(ops.values())

    few, many = terms_ops(3), terms_ops(12)
    assert few == many, f"the routing terms took {few} operations for 3 layers and {many} for 12"
