"""Method application: routing loss, what trains in each stage, and adapter save / load round trips."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import PeftModel  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from citi_engine import testing  # noqa: E402
from citi_engine.adapter import (  # noqa: E402
    Fp32MasterLinear,
    apply_method,
    load_adapter,
    read_job,
    routing_loss,
    save_adapter,
    set_trainable,
    token_routing_loss,
)
from citi_engine.errors import CitiError  # noqa: E402
from citi_engine.models import load_model  # noqa: E402
from citi_engine.molora import MoloraConfig, MoloraLinear  # noqa: E402
from citi_engine.testing import make_tiny_model_dir  # noqa: E402

MOLORA = ["model.layers.0.self_attn.k_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.q_proj"]
UCO = ["model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    return testing.tiny_llama(seed=seed, dtype=dtype, pad_token_id=0)


def batch(vocab: int = 96) -> dict:
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(1, vocab, (3, 8), generator=g)
    attention_mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2, [1] * 5 + [0] * 3])
    labels = torch.where(attention_mask.bool(), input_ids, -100)
    labels[:, :3] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "task_type": torch.tensor([1, 0, 1])}


def randomise_adapter(model: nn.Module, seed: int = 0) -> None:
    """Give B (zero at init) and the UCO copies values of their own, so every stage has gradients and a saved
    adapter that lost any part of them would change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".molora_B." in name or ".molora_router." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


# ---- routing loss ---------------------------------------------------------------------------------------------

class TwoRouters(nn.Module):
    """Two MOLoRA layers (N=1 expert) whose router weights are set by hand."""

    def __init__(self):
        super().__init__()
        config = MoloraConfig(target_modules=["x"], num_experts=1, r=1, alpha=1.0)
        self.a = MoloraLinear(nn.Linear(2, 2, bias=False), "default", config)
        self.b = MoloraLinear(nn.Linear(2, 2, bias=False), "default", config)
        with torch.no_grad():
            # logits = W_r x: x=[1,0] -> [0, ln 3] -> G = [1/4, 3/4]; x=[0,1] -> [0, 0] -> G = [1/2, 1/2]
            for layer in (self.a, self.b):
                layer.molora_router["default"].copy_(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]))

    def forward(self, x):
        return self.b(self.a(x) * 0 + x)


def test_routing_loss_matches_a_hand_computation():
    x1, x2, pad = [1.0, 0.0], [0.0, 1.0], [5.0, -3.0]  # pad tokens would change g if they were counted
    x = torch.tensor([[x1, x2, pad], [x2, pad, pad]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    task_type = torch.tensor([1, 0])
    model = TwoRouters()
    model(x)
    # Example 1 (tool):    g = [1/4 + 1/2, 3/4 + 1/2] = [3/4, 5/4];  I = [1.5, 0.5] -> Z = [1.125, 0.625]
    # Example 2 (general): g = [1/2, 1/2];                            I = [0.5, 1.5] -> Z = [0.25, 0.75]
    # mean(Z) = 11/16; population var(Z) = 2.28125/4 - (11/16)^2 = 25/256; var/mean^2 = 25/121 per layer.
    loss = routing_loss(model, task_type, mask, delta=0.5)
    assert loss.item() == pytest.approx(2 * 25 / 121, rel=1e-6)
    loss.backward()
    assert model.a.molora_router["default"].grad.abs().sum() > 0


def test_routing_loss_with_mean_balance_matches_a_hand_computation_and_ignores_length():
    x1, x2, pad = [1.0, 0.0], [0.0, 1.0], [5.0, -3.0]
    task_type = torch.tensor([1, 0])
    model = TwoRouters()
    model(torch.tensor([[x1, x2, pad], [x2, pad, pad]]))
    # Example 1 (tool):    g = mean([1/4, 3/4], [1/2, 1/2]) = [3/8, 5/8]; I = [1.5, 0.5] -> Z = [9/16, 5/16]
    # Example 2 (general): g = [1/2, 1/2];                                I = [0.5, 1.5] -> Z = [1/4, 3/4]
    # mean(Z) = 15/32; population var(Z) = 41/1024; var/mean^2 = 41/225 per layer.
    short = routing_loss(model, task_type, torch.tensor([[1, 1, 0], [1, 0, 0]]), delta=0.5, balance="mean")
    assert short.item() == pytest.approx(2 * 41 / 225, rel=1e-6)
    # The general example twice as long with the same tokens: the mean sees the same routing, the sum does not.
    model(torch.tensor([[x1, x2, pad], [x2, x2, pad]]))
    longer = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert routing_loss(model, task_type, longer, delta=0.5, balance="mean").item() == pytest.approx(short.item())
    assert routing_loss(model, task_type, longer, delta=0.5).item() != pytest.approx(2 * 25 / 121, rel=1e-3)
    with pytest.raises(ValueError, match="sum, mean"):
        routing_loss(model, task_type, longer, balance="median")


def test_sigmoid_gate_routing_loss_balances_the_experts_among_themselves_and_leaves_the_backbone_alone():
    torch.manual_seed(0)
    config = MoloraConfig(target_modules=["x"], num_experts=3, r=2, alpha=1.0, gate="sigmoid")
    layer = MoloraLinear(nn.Linear(4, 4, bias=False), "default", config)
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    task_type = torch.tensor([1, 0])
    layer(x)
    loss = routing_loss(layer, task_type, mask, balance="mean")
    # By hand: the experts' softmax among themselves, averaged over each example's real tokens, Z over B*N entries
    q = torch.softmax(F.linear(x, layer.molora_router["default"])[..., 1:], dim=-1)
    g = torch.einsum("btn,bt->bn", q, mask.float()) / mask.sum(1, keepdim=True)
    assert loss.item() == pytest.approx((g.flatten().var(unbiased=False) / g.flatten().mean() ** 2).item(), rel=1e-5)
    loss.backward()
    grad = layer.molora_router["default"].grad
    assert grad[1:].abs().sum() > 0 and grad[0].abs().max() < 1e-7  # the backbone's logit is not balanced
    with torch.no_grad():
        layer.molora_router["default"][0] += 3.0  # move the backbone's share only
    layer(x)
    assert routing_loss(layer, task_type, mask, balance="mean").item() == pytest.approx(loss.item(), rel=1e-5)


class ThreeRouted(nn.Module):
    """Three MOLoRA layers in a row with random routers (3 experts), for the routing terms over several layers."""

    def __init__(self, gate: str):
        super().__init__()
        torch.manual_seed(1)
        config = MoloraConfig(target_modules=["x"], num_experts=3, r=2, alpha=1.0, gate=gate)
        self.layers = nn.ModuleList(MoloraLinear(nn.Linear(4, 4, bias=False), "default", config) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _per_layer_routing_terms(model, task_type, mask, target, delta, balance):
    """The two routing terms written layer by layer from their definitions (the docstrings of routing_loss and
    token_routing_loss), the reference the stacked computation must equal."""
    balancing, token = [], []
    for layer in model.layers:
        probs, sigmoid = layer.router_probs["default"], layer.gate["default"] == "sigmoid"
        if sigmoid:
            probs = probs[..., 1:] / (1.0 - probs[..., :1])
        g = torch.einsum("btn,bt->bn", probs, mask.float())
        if balance == "mean":
            g = g / mask.sum(1, keepdim=True)
        if not sigmoid:
            tool = task_type.reshape(-1, 1) == 1
            sign = torch.tensor([1.0] + [-1.0] * (g.shape[1] - 1))
            g = (1.0 + delta * torch.where(tool, sign, -sign)) * g
        balancing.append(g.flatten().var(unbiased=False) / g.flatten().mean() ** 2)
        p0 = layer.router_probs["default"][..., 0]
        on, off = (target == 1).float(), (target == 0).float()
        token.append(-(torch.log(p0) * on).sum() / on.sum() - (torch.log1p(-p0) * off).sum() / off.sum())
    return sum(balancing), sum(token) / len(token)


@pytest.mark.parametrize("gate,balance", [("softmax", "sum"), ("softmax", "mean"), ("sigmoid", "mean")])
def test_routing_terms_over_all_layers_at_once_equal_the_per_layer_definitions_with_their_gradients(gate, balance):
    model = ThreeRouted(gate)
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    task_type = torch.tensor([1, 0])
    target = torch.tensor([[-1.0, 0.0, 0.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    grads = []
    for compute in ("stacked", "per layer"):
        model.zero_grad()
        model(x)
        if compute == "stacked":
            terms = (routing_loss(model, task_type, mask, delta=0.5, balance=balance), token_routing_loss(model, target))
        else:
            terms = _per_layer_routing_terms(model, task_type, mask, target, 0.5, balance)
        (terms[0] + terms[1]).backward()
        grads.append(([t.item() for t in terms], [m.molora_router["default"].grad.clone() for m in model.layers]))
    (values, router_grads), (expected, expected_grads) = grads
    assert values == pytest.approx(expected, rel=1e-5)
    for got, want in zip(router_grads, expected_grads, strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_routing_loss_needs_molora_layers_and_a_forward():
    with pytest.raises(ValueError, match="MOLoRA layers"):
        routing_loss(tiny_llama(), torch.tensor([1]), torch.ones(1, 4))
    with pytest.raises(RuntimeError, match="run the model first"):
        routing_loss(TwoRouters(), torch.tensor([1]), torch.ones(1, 3))


# ---- stages ---------------------------------------------------------------------------------------------------

def _loss(model, b, with_routing: bool) -> torch.Tensor:
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    if with_routing:
        return out.loss + 0.1 * routing_loss(model, b["task_type"], b["attention_mask"])
    return out.loss


STAGE_CASES = [
    ("citi", "router_pretraining", lambda n: ".molora_router." in n),
    ("citi", "molora", lambda n: ".molora_" in n),
    ("citi", "uco", lambda n: ".modules_to_save." in n),
    ("lora", "lora", lambda n: ".lora_A." in n or ".lora_B." in n),
    ("full", "full", lambda n: True),
]


@pytest.mark.parametrize("method, stage, expected", STAGE_CASES, ids=[c[1] for c in STAGE_CASES])
def test_each_stage_trains_exactly_its_parameters(method, stage, expected):
    model = apply_method(tiny_llama(), method, molora=MOLORA, uco=UCO, num_experts=2, rank=4, alpha=4.0)
    randomise_adapter(model)
    if method == "lora":
        with torch.no_grad():  # B starts at zero; give A a gradient too
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.1)
    trainable = set_trainable(model, stage)
    names = [n for n, _ in model.named_parameters()]
    assert trainable == [n for n in names if expected(n)] and trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)

    before = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    _loss(model, batch(), with_routing=method == "citi").backward()
    optimizer.step()
    after = model.state_dict()
    params = dict(model.named_parameters())
    for key, old in before.items():
        if key in params and params[key].requires_grad:
            assert not torch.equal(after[key], old), f"{key} should have been trained in stage {stage}"
        else:
            assert torch.equal(after[key], old), f"{key} changed in stage {stage}"


def test_set_trainable_refuses_a_stage_the_model_cannot_train():
    with pytest.raises(ValueError, match="nothing to train"):
        set_trainable(tiny_llama(), "router_pretraining")
    with pytest.raises(ValueError, match="unknown stage"):
        set_trainable(tiny_llama(), "stage4")


def test_apply_method_validates_components():
    with pytest.raises(ValueError, match="not decoder-layer linear projections"):
        apply_method(tiny_llama(), "citi", molora=["lm_head"])
    with pytest.raises(ValueError, match="both MOLoRA and UCO"):
        apply_method(tiny_llama(), "citi", molora=MOLORA, uco=[MOLORA[0]])
    with pytest.raises(ValueError, match="unknown method"):
        apply_method(tiny_llama(), "qlora")


def test_uco_components_keep_fp32_masters_on_a_bf16_base():
    model = apply_method(tiny_llama(dtype=torch.bfloat16), "citi", molora=MOLORA, uco=UCO)
    set_trainable(model, "uco")
    copies = [m for n, m in model.named_modules() if n.endswith(".modules_to_save.default")]
    assert len(copies) == 2 and all(isinstance(m, Fp32MasterLinear) for m in copies)
    assert all(m.weight.dtype == torch.float32 for m in copies)
    b = batch()
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(m.weight.grad is not None and m.weight.grad.dtype == torch.float32 for m in copies)


# ---- save / load ----------------------------------------------------------------------------------------------

def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_citi_adapter_round_trips_with_uco_weights(tiny_dir, tmp_path):
    base, tokenizer = load_model(tiny_dir, device="cpu")
    ids = tokenizer(["The weather in Paris is", "Call get_time"], return_tensors="pt", padding=True)["input_ids"]
    base_logits = _logits(base, ids)
    model = apply_method(base, "citi", molora=MOLORA, uco=UCO, num_experts=3, rank=4, alpha=8.0)
    randomise_adapter(model)
    tuned = _logits(model, ids)
    assert not torch.allclose(tuned, base_logits, atol=1e-3)

    out = save_adapter(model, tmp_path / "adapter", {"model": tiny_dir, "seed": 7})
    assert set(os.listdir(out)) == {"adapter_config.json", "adapter_model.safetensors", "citi_job.json"}
    job = read_job(out)
    assert job["format"] == "peft" and job["method"] == "citi" and job["base_model"] == tiny_dir
    assert job["components"] == {"molora": MOLORA, "uco": UCO, "num_experts": 3, "rank": 4, "alpha": 8.0}
    assert job["config"] == {"model": tiny_dir, "seed": 7}

    loaded, loaded_tok = load_adapter(out, device="cpu")
    assert isinstance(loaded, PeftModel) and not loaded.training
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id
    assert torch.equal(_logits(loaded, ids), tuned)

    # The plain peft path restores the same model, UCO weights included.
    fresh, _ = load_model(tiny_dir, device="cpu")
    direct = PeftModel.from_pretrained(fresh, str(out))
    assert torch.equal(_logits(direct, ids), tuned)
    uco_saved = dict(model.named_parameters())[f"base_model.model.{UCO[0]}.modules_to_save.default.weight"]
    uco_loaded = dict(direct.named_parameters())[f"base_model.model.{UCO[0]}.modules_to_save.default.weight"]
    assert torch.equal(uco_loaded, uco_saved)


def test_lora_and_full_round_trip(tiny_dir, tmp_path):
    base, tokenizer = load_model(tiny_dir, device="cpu")
    ids = tokenizer(["Hello there"], return_tensors="pt")["input_ids"]
    lora = apply_method(base, "lora", lora_rank=4, lora_alpha=8)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    expected = _logits(lora, ids)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "README.md").write_text("# our model card\n")
    out = save_adapter(lora, tmp_path / "lora")  # the base spec comes from load_model
    assert (out / "README.md").read_text() == "# our model card\n"  # the caller's card, untouched by peft
    job = read_job(out)
    assert job["method"] == "lora" and job["base_model"] == tiny_dir and len(job["components"]["lora"]) == 14
    loaded, _ = load_adapter(out, device="cpu")
    assert torch.equal(_logits(loaded, ids), expected)

    full, _ = load_model(tiny_dir, device="cpu")
    full = apply_method(full, "full")
    assert all(p.requires_grad for p in full.parameters())
    with torch.no_grad():
        full.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    expected = _logits(full, ids)
    out = save_adapter(full, tmp_path / "full", {"model": tiny_dir})
    assert read_job(out)["format"] == "full" and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    loaded, _ = load_adapter(out, device="cpu")
    assert not isinstance(loaded, PeftModel)
    assert torch.equal(_logits(loaded, ids), expected)


def test_load_adapter_says_what_is_missing(tmp_path, tiny_dir):
    with pytest.raises(CitiError, match="holds no adapter") as err:
        load_adapter(tmp_path)
    assert err.value.code == "adapter_not_found"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "MOLORA"}))
    with pytest.raises(CitiError, match="pass base="):
        load_adapter(tmp_path)


def test_the_tokenizer_is_read_once_per_process_and_again_when_its_files_change(tmp_path):
    import shutil
    from pathlib import Path

    from citi_engine.models import load_tokenizer
    from citi_engine.specs import resolve_model_spec
    from citi_engine.testing import make_tiny_model_dir

    model_dir = make_tiny_model_dir(str(tmp_path / "m"))
    spec = resolve_model_spec(model_dir)
    first = load_tokenizer(spec)
    assert load_tokenizer(spec) is first  # the validation pass and the model load share one
    copy_dir = tmp_path / "copy"
    shutil.copytree(model_dir, copy_dir)
    assert load_tokenizer(resolve_model_spec(str(copy_dir))) is not first  # another source, another tokenizer
    config = Path(model_dir) / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")  # changed: read again
    assert load_tokenizer(spec) is not first
