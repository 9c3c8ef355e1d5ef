"""A hub id where the hub cannot be reached fails at once, naming the spec: for the tokenizer (read first, to
check lengths), the model, and the command line. Never the hub client's minute of retries or a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from citi_engine.errors import ModelSpecError
from citi_engine.models import load_model, load_tokenizer
from citi_engine.specs import resolve_model_spec

REPO = Path(__file__).resolve().parents[2]
HUB_ID = "someorg/some-model"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable endpoint"])
def test_a_hub_id_offline_fails_at_once_for_tokenizer_and_model(monkeypatch, how):
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    resolved = resolve_model_spec(HUB_ID)
    assert resolved.kind == "hub"
    for load in (lambda: load_tokenizer(resolved), lambda: load_model(HUB_ID, device="cpu")):
        start = time.monotonic()
        with pytest.raises(ModelSpecError) as err:
            load()
        assert time.monotonic() - start < 10
        assert err.value.code == "model_unavailable_offline" and err.value.param == "model"
        assert HUB_ID in err.value.message and "local directory" in err.value.message


def test_finetune_on_an_unreachable_hub_id_prints_one_message_and_exits_2(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "citi_engine.cli.main", "finetune", "--model", HUB_ID, "--data",
         str(REPO / "examples" / "tools_train.jsonl"), "--out", str(tmp_path / "out"), "--max-steps", "3",
         "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert f"model '{HUB_ID}' is a hub id, but the hub cannot be reached" in out.stderr
    assert not (tmp_path / "out" / "adapter_config.json").exists()
