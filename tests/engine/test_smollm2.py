"""One CITI job on the real SmolLM2-135M-Instruct (from its PyPI package): every phase, one step per stage.

Kept small enough for CI on 2 CPU cores (about 20 s once the GGUF's plain copy exists): 2 examples per set for
importance, 2 replay answers of 8 tokens, short examples, no evaluation.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from citi_engine import DEFAULT_MODEL  # noqa: E402
from citi_engine.components import fraction_to_count  # noqa: E402
from citi_engine.training.config import ComponentsConfig  # noqa: E402
from tests.engine.test_train import small_config, tool_example, write_jsonl  # noqa: E402

pytestmark = pytest.mark.smollm2


def test_citi_runs_every_phase_on_smollm2(tmp_path):
    from citi_engine.train import finetune

    data = write_jsonl(tmp_path / "train.jsonl", [tool_example(i) for i in range(10)])
    events = []
    cfg = small_config(DEFAULT_MODEL, data, tmp_path / "out", budget={"max_steps": 3},
                       hyperparameters={"importance_examples": 2, "importance_batch_size": 2, "replay_examples": 2,
                                        "replay_max_new_tokens": 8, "max_length": 256})
    result = finetune(cfg, on_event=events.append)

    stages = [e["stage"] for e in events if e["type"] == "stage"]
    assert stages[:4] == ["validating", "loading", "replay", "importance"]
    assert result.stage_steps == {"router_pretraining": 1, "molora": 1, "uco": 1}
    importance = json.loads((tmp_path / "out" / "importance.json").read_text())
    assert len(importance["components"]) == 30 * 7  # 30 layers x q,k,v,o,gate,up,down
    defaults = ComponentsConfig()  # the shipped fractions of the 210 components
    assert len(importance["molora"]) == fraction_to_count(defaults.molora_fraction, 210)
    assert len(importance["uco"]) == fraction_to_count(defaults.uco_fraction, 210)
    losses = [e["loss"] for e in events if e["type"] == "progress" and e["loss"] is not None]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)  # a real model: finite, sensible CE
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_of_the_gguf_model_saves_a_plain_model(tmp_path):
    """transformers marks a GGUF-loaded model as quantized and refuses to save it; ours is plain weights. (The
    model comes from the GGUF's plain copy here; the copy itself is saved past that mark: test_gguf_copy.py.)"""
    import torch

    from citi_engine.adapter import load_adapter
    from citi_engine.train import finetune

    data = write_jsonl(tmp_path / "train.jsonl", [tool_example(i) for i in range(10)])
    cfg = small_config(DEFAULT_MODEL, data, tmp_path / "out", method="full", budget={"max_steps": 1},
                       hyperparameters={"max_length": 256})
    finetune(cfg)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in saved  # loads as an ordinary HF model, no gguf needed
    tuned, _ = load_adapter(tmp_path / "out")
    from citi_engine.models import load_model

    base, _ = load_model(DEFAULT_MODEL)
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert changed  # the trained weights are what was saved, not the base's
