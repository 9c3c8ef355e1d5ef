"""bench/router_probe_cpu.py's choice of settings: names are checked before any model loads, and every setting
names each routing term it sets (the sigmoid gate's included)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import router_probe_cpu  # noqa: E402


def test_an_unknown_setting_is_refused_with_the_names_there_are(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        router_probe_cpu.main(["--out", str(tmp_path), "--settings", "sigmoid;sigmoid, token weight 3"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "sigmoid, token weight 0.3" in err and "balancing loss, means (shipped now)" in err
    assert not any(tmp_path.iterdir())


def test_every_setting_gives_each_routing_term():
    gates = {settings[5] for settings in router_probe_cpu.SETTINGS.values()}
    assert all(len(settings) == 6 for settings in router_probe_cpu.SETTINGS.values())
    assert gates == {"softmax", "sigmoid"}
