"""The MOLoRA layer (fused computation against a per-expert reference) and its registration with peft."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
from packaging.version import Version  # noqa: E402
from peft import PeftConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import PeftType, register_peft_method  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import citi_engine.molora as molora  # noqa: E402
from citi_engine import testing  # noqa: E402
from citi_engine.molora import FrozenMoloraLinear, MoloraConfig, MoloraLinear, MoloraModel  # noqa: E402
from citi_engine.molora import layer as molora_layer  # noqa: E402
from citi_engine.molora.layer import ROUTER_ALIGN, molora_mix, router_gates  # noqa: E402


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    return testing.tiny_llama(seed=seed, dtype=dtype, pad_token_id=0)


def naive_molora(x, W0, b0, W_r, A, B, n, r, alpha, gate="softmax"):
    """The method page's formula with one term per expert (the reference the fused layer must match); with the
    sigmoid gate G(x) = [s, (1 - s) softmax(l_1..l_N)], s = sigmoid(l_0), written out the long way."""
    logits = x @ W_r.T
    if gate == "softmax":
        G = torch.softmax(logits, dim=-1)
    else:
        s = 1.0 / (1.0 + torch.exp(-logits[..., :1]))
        e = torch.exp(logits[..., 1:])
        G = torch.cat([s, (1.0 - s) * e / e.sum(-1, keepdim=True)], dim=-1)
    h = x @ W0.T + (b0 if b0 is not None else 0)
    for i in range(n):
        A_i, B_i = A[i * r:(i + 1) * r], B[:, i * r:(i + 1) * r]
        h = h + G[..., i + 1:i + 2] * (alpha / r) * (x @ A_i.T @ B_i.T)
    return h, G


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_layer_equals_per_expert_reference_in_outputs_and_gradients(bias, gate):
    torch.manual_seed(0)
    n, r, alpha = 3, 4, 3.0
    base = nn.Linear(12, 10, bias=bias).double()
    layer = MoloraLinear(base, "default", MoloraConfig(target_modules=["x"], num_experts=n, r=r, alpha=alpha,
                                                       init_weights=False, gate=gate)).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 10, dtype=torch.float64)

    out = layer(x)
    (out * upstream).sum().backward()

    ref_params = [p.detach().clone().requires_grad_(True) for p in
                  (layer.molora_router["default"], layer.molora_A["default"], layer.molora_B["default"])]
    x_ref = x.detach().clone().requires_grad_(True)
    ref, G = naive_molora(x_ref, base.weight.detach(), None if base.bias is None else base.bias.detach(),
                          *ref_params, n, r, alpha, gate)
    (ref * upstream).sum().backward()

    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.router_probs["default"], G, rtol=1e-12, atol=1e-12)
    assert (ref - x_ref.detach() @ base.weight.detach().T).abs().max() > 1e-3  # the experts really contribute
    for got, want in zip((layer.molora_router["default"], layer.molora_A["default"], layer.molora_B["default"], x),
                         (*ref_params, x_ref), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
        assert want.grad.abs().max() > 0


def two_matmul_molora(layer, x, x_experts=None, adapter="default"):
    """The training layer before its router and A shared a matmul: W_r x and A x apart (A on ``x_experts`` if given)."""
    W_r, A, B = layer.molora_router[adapter], layer.molora_A[adapter], layer.molora_B[adapter]
    h = F.linear(x if x_experts is None else x_experts, A)
    mixed, G = molora_mix(F.linear(x, W_r), h, layer.num_experts[adapter], layer.r[adapter], layer.scaling[adapter])
    return layer.base_layer(x) + F.linear(mixed, B), G


class LinearCalls(TorchFunctionMode):
    """Records the weight shape of every ``F.linear`` (every matmul of a linear layer) run inside it."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.weights.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


def molora_layer_fp32(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(64, 48)
    return MoloraLinear(base, "default", MoloraConfig(target_modules=["x"], num_experts=4, r=8, alpha=16.0,
                                                      dropout=dropout, init_weights=False))


def test_without_dropout_router_and_experts_share_one_matmul_and_match_the_two_matmul_path():
    layer = molora_layer_fp32()
    x = torch.randn(3, 7, 64, requires_grad=True)
    upstream = torch.randn(3, 7, 48)
    with LinearCalls() as calls:
        out = layer(x)
    assert calls.weights == [(48, 64), (5 + 4 * 8, 64), (48, 4 * 8)]  # W0, [W_r; A] together, B
    (out * upstream).sum().backward()

    params = (layer.molora_router["default"], layer.molora_A["default"], layer.molora_B["default"])
    ref_layer = molora_layer_fp32()
    x_ref = x.detach().clone().requires_grad_(True)
    ref, G = two_matmul_molora(ref_layer, x_ref)
    (ref * upstream).sum().backward()
    ref_params = (ref_layer.molora_router["default"], ref_layer.molora_A["default"], ref_layer.molora_B["default"])

    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.router_probs["default"], G, rtol=1e-6, atol=1e-7)
    assert (ref - layer.base_layer(x_ref)).abs().max() > 1e-2  # the experts really contribute
    for got, want in zip((*params, x), (*ref_params, x_ref), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)
        assert want.grad.abs().max() > 1e-3
    # The parameters stay three, under their own names: saved adapters and the optimizer see no change.
    assert [n for n, _ in layer.named_parameters() if "molora" in n] == [
        "molora_router.default", "molora_A.default", "molora_B.default"]


def test_with_dropout_the_router_sees_x_without_dropout_and_the_experts_see_it_dropped():
    layer = molora_layer_fp32(dropout=0.5)
    x = torch.randn(3, 7, 64)
    torch.manual_seed(7)
    with LinearCalls() as calls:
        out = layer(x)
    assert calls.weights == [(48, 64), (5, 64), (4 * 8, 64), (48, 4 * 8)]  # W0, W_r, A, B: two matmuls on x
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)  # the mask the layer drew
    with torch.no_grad():
        ref, G = two_matmul_molora(layer, x, x_experts=dropped)
        G_dropped = torch.softmax(F.linear(dropped, layer.molora_router["default"]), dim=-1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.router_probs["default"], G, rtol=1e-6, atol=1e-7)
    assert (layer.router_probs["default"] - G_dropped).abs().max() > 1e-2  # routing dropped x would differ

    # In eval mode dropout is the identity, so router and A share one matmul again.
    layer.eval()
    with torch.no_grad():
        with LinearCalls() as calls:
            out = layer(x)
        ref, G = two_matmul_molora(layer, x)
    assert calls.weights == [(48, 64), (5 + 4 * 8, 64), (48, 4 * 8)]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.router_probs["default"], G, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_serving_layer_computes_what_the_training_layer_computes(bias, gate):
    torch.manual_seed(1)
    n, r, alpha = 3, 4, 3.0
    base = nn.Linear(12, 10, bias=bias).double()
    layer = MoloraLinear(base, "default", MoloraConfig(target_modules=["x"], num_experts=n, r=r, alpha=alpha,
                                                       init_weights=False, gate=gate)).double()
    frozen = FrozenMoloraLinear(base, layer.molora_router["default"].detach(), layer.molora_A["default"].detach(),
                                layer.molora_B["default"].detach(), n, r, alpha / r, gate)
    assert frozen.base is base and not any(p.requires_grad for p in frozen.parameters(recurse=False))
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        ref, _ = naive_molora(x, base.weight, base.bias, layer.molora_router["default"], layer.molora_A["default"],
                              layer.molora_B["default"], n, r, alpha, gate)
        torch.testing.assert_close(frozen(x), layer(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(frozen(x), ref, rtol=1e-12, atol=1e-12)
        assert (ref - base(x)).abs().max() > 1e-3  # the experts really contribute
        assert frozen.router_a.shape == (ROUTER_ALIGN, 12)  # (n + 1 + n * r) = 16 rows, padded with zeros
        unpadded = FrozenMoloraLinear(base, layer.molora_router["default"].detach(), layer.molora_A["default"].detach(),
                                      layer.molora_B["default"].detach(), n, r, alpha / r, gate, align=1)
        assert unpadded.router_a.shape == (16, 12)
        torch.testing.assert_close(unpadded(x), frozen(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_one_row_reductions_under_torch_compile_compute_the_serving_layer(gate, monkeypatch):
    """ONE_ROW_REDUCTIONS: a compiled one-row forward written as reductions gives the matmul form's output;
    eager and multi-row forwards are untouched by the switch."""
    torch.manual_seed(3)
    n, r = 4, 8
    base = nn.Linear(48, 40, bias=True)
    frozen = FrozenMoloraLinear(base, torch.randn(n + 1, 48), torch.randn(n * r, 48) * 0.3,
                                torch.randn(40, n * r) * 0.3, n, r, 2.0, gate)
    one, rows = torch.randn(1, 1, 48), torch.randn(2, 3, 48)
    with torch.no_grad():
        want_one, want_rows = frozen(one), frozen(rows)
        assert (want_one - base(one)).abs().max() > 1e-2  # the experts really contribute
        monkeypatch.setattr(molora_layer, "ONE_ROW_REDUCTIONS", True)
        torch.testing.assert_close(frozen(one), want_one, rtol=0, atol=0)  # eager: the matmul form as before
        traced = []  # the reduction form is taken while torch.compile traces the one-row call, and only then
        reductions = FrozenMoloraLinear._one_row_delta
        monkeypatch.setattr(FrozenMoloraLinear, "_one_row_delta",
                            lambda self, x: traced.append(tuple(x.shape)) or reductions(self, x))
        torch._dynamo.reset()
        compiled = torch.compile(frozen)
        torch.testing.assert_close(compiled(one), want_one, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(rows), want_rows, rtol=1e-5, atol=1e-5)
        assert traced == [(1, 1, 48)]


def test_sigmoid_gate_gives_the_backbone_its_own_logit_and_the_experts_the_rest():
    torch.manual_seed(2)
    logits = torch.randn(6, 5, dtype=torch.float64) * 3
    G = router_gates(logits, "sigmoid")
    torch.testing.assert_close(G.sum(-1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(G[:, 0], torch.sigmoid(logits[:, 0]))
    torch.testing.assert_close(G[:, 1:] / G[:, 1:].sum(-1, keepdim=True), torch.softmax(logits[:, 1:], -1))
    moved = logits.clone()
    moved[:, 1:] += torch.randn(6, 4, dtype=torch.float64) * 5  # the experts' logits move...
    torch.testing.assert_close(router_gates(moved, "sigmoid")[:, 0], G[:, 0])  # ...the backbone's share does not
    assert (router_gates(moved, "softmax")[:, 0] - router_gates(logits, "softmax")[:, 0]).abs().max() > 1e-2
    assert router_gates(logits.float(), "sigmoid", torch.float32).dtype == torch.float32
    assert router_gates(logits.to(torch.bfloat16), "sigmoid", torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="softmax, sigmoid"):
        router_gates(logits, "tanh")


def test_fresh_layer_is_the_identity_and_keeps_fp32_masters_on_a_bf16_base():
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    layer = MoloraLinear(base, "default", MoloraConfig(target_modules=["x"]))
    assert layer.molora_A["default"].shape == (4 * 8, 16)  # defaults: N=4 experts of rank 8
    assert layer.molora_B["default"].shape == (8, 4 * 8)
    assert layer.molora_router["default"].shape == (5, 16)  # N+1 outputs: the backbone neuron first
    assert all(p.dtype == torch.float32 for p in layer.molora_router.values())
    assert all(p.dtype == torch.float32 for p in [*layer.molora_A.values(), *layer.molora_B.values()])
    assert torch.count_nonzero(layer.molora_B["default"]) == 0 and torch.count_nonzero(layer.molora_A["default"]) > 0
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, base(x))
    assert layer.router_probs["default"].shape == (3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    ({"num_experts": 0}, "num_experts"),
    ({"r": 0}, "rank"),
    ({"alpha": 0}, "alpha"),
    ({"dropout": 1.0}, "dropout"),
    ({"target_modules": None}, "target_modules"),
    ({"modules_to_save": ["a.q_proj"]}, "both a MOLoRA target"),
    ({"gate": "tanh"}, "gate must be one of softmax, sigmoid"),
])
def test_config_refuses_impossible_settings(kwargs, message):
    settings = {"target_modules": ["a.q_proj"], **kwargs}
    with pytest.raises(ValueError, match=message):
        MoloraConfig(**settings)


def test_molora_replaces_exactly_the_named_modules_and_cannot_be_merged():
    model = tiny_llama()
    targets = ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    pm = get_peft_model(model, MoloraConfig(target_modules=targets, modules_to_save=["model.layers.0.mlp.up_proj"],
                                            task_type="CAUSAL_LM"))
    replaced = [n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, MoloraLinear)]
    assert replaced == targets
    trainable = {n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.molora_{k}.default" for t in targets for k in ("router", "A", "B")} | {
        "model.layers.0.mlp.up_proj.modules_to_save.default.weight"}
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()


# ---- the guard: what the registration relies on in peft ------------------------------------------------------

def test_peft_registration_guard(tmp_path):
    """Fails loudly when a peft release changes what `citi_engine.molora` relies on to register itself."""
    low, high = molora.TESTED_PEFT
    assert low <= Version(peft.__version__) < high, (
        f"peft {peft.__version__} is outside the tested range [{low}, {high}): re-run these tests, then move the pin "
        "in citi_engine/molora/__init__.py and pyproject.toml")

    # 1. register_peft_method still takes these arguments and still refuses names missing from PeftType
    #    (if it stops refusing, the enum extension can go).
    assert {"name", "config_cls", "model_cls", "prefix"} <= set(inspect.signature(register_peft_method).parameters)
    with pytest.raises(ValueError, match="Unknown PEFT type"):
        register_peft_method(name="citinotamember", config_cls=MoloraConfig, model_cls=MoloraModel)

    # 2. The enum member behaves like a built-in one.
    member = PeftType.MOLORA
    assert PeftType("MOLORA") is member and PeftType["MOLORA"] is member
    assert member in list(PeftType) and "MOLORA" in list(PeftType)
    assert isinstance(member, str) and member == "MOLORA" and member.value == "MOLORA" and member.name == "MOLORA"
    assert json.dumps({"peft_type": member}) == '{"peft_type": "MOLORA"}'

    # 3. The mapping tables peft dispatches on point at our classes; registering again changes nothing.
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    molora.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is MoloraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is MoloraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "molora_"
    assert PeftType._member_names_.count("MOLORA") == 1

    # 4. End to end in a fresh interpreter: importing citi_engine.molora alone is enough to load an adapter.
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    pm = get_peft_model(model, MoloraConfig(target_modules=["model.layers.0.self_attn.v_proj"],
                                            modules_to_save=["model.layers.1.self_attn.o_proj"], init_weights=False,
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        pm.base_model.model.model.layers[1].self_attn.o_proj.modules_to_save["default"].weight.mul_(3.0)
        x = torch.arange(1, 13).reshape(2, 6)
        torch.save({"x": x, "logits": pm(input_ids=x).logits}, tmp_path / "expected.pt")
    pm.save_pretrained(tmp_path / "adapter")
    assert isinstance(PeftConfig.from_pretrained(tmp_path / "adapter"), MoloraConfig)
    script = textwrap.dedent(f"""
        import torch
        import citi_engine.molora
        from peft import PeftModel
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
        model = PeftModel.from_pretrained(LlamaForCausalLM(config).eval(), {str(tmp_path / "adapter")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            assert torch.equal(model(input_ids=expected["x"]).logits, expected["logits"]), "logits differ"
        print("reloaded", type(model.peft_config["default"]).__name__)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "reloaded MoloraConfig" in run.stdout


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_reloaded_adapter_in_this_process_matches(tmp_path, low_cpu_mem_usage):
    model = tiny_llama(seed=1)
    pm = get_peft_model(model, MoloraConfig(target_modules=["model.layers.1.mlp.gate_proj"], init_weights=False,
                                            num_experts=2, r=3, alpha=5.0, task_type="CAUSAL_LM"))
    x = torch.arange(3, 11).reshape(1, 8)
    with torch.no_grad():
        expected = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    config = loaded.peft_config["default"]
    assert (config.num_experts, config.r, config.alpha) == (2, 3, 5.0)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference


def test_adapter_loaded_onto_a_bf16_base_keeps_fp32_masters(tmp_path):
    pm = get_peft_model(tiny_llama(seed=2), MoloraConfig(target_modules=["model.layers.0.mlp.up_proj"],
                                                         init_weights=False, task_type="CAUSAL_LM"))
    saved = {n: p.detach().clone() for n, p in pm.named_parameters() if ".molora_" in n}
    pm.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(tiny_llama(seed=2, dtype=torch.bfloat16), tmp_path,
                                           low_cpu_mem_usage=low_cpu_mem_usage)
        params = dict(loaded.named_parameters())
        for name, value in saved.items():
            assert params[name].dtype == torch.float32 and torch.equal(params[name], value)
        with torch.no_grad():
            assert loaded(input_ids=torch.arange(1, 9).reshape(1, 8)).logits.dtype == torch.bfloat16
