"""The served adapter's delta in one Triton kernel (citi_engine/molora/fused.py) computes what the four-kernel
layer computes. On this CPU the kernel runs under Triton's interpreter, which must be switched on before Triton
is imported, so each check runs in a fresh interpreter process. The GPU's own check (bf16, the real shapes,
the time it saves) is bench/fused_check.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(code: str) -> dict:
    """Run ``code`` under Triton's interpreter in a fresh process; it prints one JSON line, returned."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LAYERS = """
import json, torch
from torch import nn
from citi_engine.molora import fused
from citi_engine.molora import layer as molora_layer
from citi_engine.molora.layer import FrozenMoloraLinear
torch.manual_seed(0)

def make(n, r, d_in, d_out, gate, dtype, align=None, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    router = torch.randn(n + 1, d_in, generator=g) * 0.3
    a = torch.randn(n * r, d_in, generator=g) * 0.2
    b = torch.randn(d_out, n * r, generator=g) * 0.6
    return FrozenMoloraLinear(base, router, a, b, n, r, scaling=2.0, gate=gate, align=align)
"""


def test_fused_delta_equals_the_four_kernel_layer_across_block_edges_gates_and_dtypes():
    # shapes that cross every block edge of the kernel: rows past 16, d_in past 64, d_out past 128, N*r not a
    # power of two and above 16, router rows padded (align 64) and not (align 1); both gates; fp32 and fp16
    out = run_interpreted(LAYERS + """
cases = []
for n, r, d_in, d_out, rows, align in [(4, 8, 96, 200, 3, 64), (3, 5, 40, 24, 17, 1), (5, 8, 130, 130, 1, 64)]:
    for gate in ("softmax", "sigmoid"):
        for dtype in (torch.float32, torch.float16):
            layer = make(n, r, d_in, d_out, gate, dtype, align=align, bias=True)
            x = torch.randn(rows, 1, d_in).to(dtype)  # a decode step's shape: one new token a row
            with torch.no_grad():
                molora_layer.FUSED_DELTA = False
                four = layer(x).float()
                base = layer.base(x).float()
                molora_layer.FUSED_DELTA = True
                one = layer(x).float()
            cases.append({"dtype": str(dtype), "err": (one - four).abs().max().item(),
                          "delta": (four - base).abs().max().item(), "scale": four.abs().max().item()})
print(json.dumps(cases))
""")
    for case in out:
        # the delta is far above the tolerance, so a kernel that adds nothing (err == delta) or a wrong part fails
        assert case["delta"] > 0.1, case
        # both ways round once to the layer's dtype at the end, from sums taken in different orders: a few units in
        # the last place of the largest output (fp16: 2^-10 of it)
        assert case["err"] <= (1e-5 if case["dtype"] == "torch.float32" else 2 ** -8) * max(case["scale"], 1.0), case


def test_layer_takes_the_kernel_for_a_decode_steps_rows_only_and_never_when_asked_not_to():
    out = run_interpreted(LAYERS + """
calls = []
real = fused.molora_add_
fused.molora_add_ = lambda *a, **k: calls.append(1) or real(*a, **k)
layer = make(4, 8, 64, 64, "softmax", torch.float32)
seen = {}
with torch.no_grad():
    for name, rows, on in [("decode", 16, True), ("prefill", fused.MAX_ROWS + 1, True), ("off", 16, False)]:
        molora_layer.FUSED_DELTA = on
        calls.clear()
        layer(torch.randn(rows, 64))
        seen[name] = len(calls)
molora_layer.FUSED_DELTA = True
x = torch.randn(2, 64, requires_grad=True)
calls.clear()
layer(x).sum().backward()  # a gradient asked for: the four kernels, which autograd can follow
seen["grad"] = len(calls)
seen["grad_ok"] = bool(x.grad.abs().sum() > 0)
print(json.dumps(seen))
""")
    assert out == {"decode": 1, "prefill": 0, "off": 0, "grad": 0, "grad_ok": True}
