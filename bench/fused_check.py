"""The served adapter's delta in one Triton kernel against its four kernels, one component at a time, on a GPU.

For each component shape of SmolLM2 and the 1B shape (every projection kind), each gate and 1, 16 and 64 rows:
how far the fused delta (:func:`citi_engine.molora.fused.molora_add_`) and the four-kernel path of
:class:`~citi_engine.molora.layer.FrozenMoloraLinear` each land from the same layer computed in fp32, and the GPU
time of one component's forward each way, as a decode step sees it: 200 forwards captured in a CUDA graph and
replayed (nothing launched from the host), divided by 200. Random weights (speed and rounding do not depend on
them). Writes JSON and a Markdown table.

    python bench/fused_check.py --out bench/results/fused_check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from provenance import commit, versions, write_results  # noqa: E402

# (model, projection, d_in, d_out); SmolLM2-135M and the 1B shape (hidden 2048, intermediate 8192, 8 kv heads of 64)
SHAPES = [("smollm2", "q/o", 576, 576), ("smollm2", "k/v", 576, 192), ("smollm2", "gate/up", 576, 1536),
          ("smollm2", "down", 1536, 576), ("1b", "q/o", 2048, 2048), ("1b", "k/v", 2048, 512),
          ("1b", "gate/up", 2048, 8192), ("1b", "down", 8192, 2048)]
REPLAYS = 200


def build(d_in: int, d_out: int, experts: int, rank: int, gate: str, dtype, device):
    import torch
    from torch import nn

    from citi_engine.molora.layer import FrozenMoloraLinear

    base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    router = torch.randn(experts + 1, d_in, device=device) / d_in ** 0.5 * 4  # gates well away from uniform
    a = torch.randn(experts * rank, d_in, device=device) / d_in ** 0.5
    b = torch.randn(d_out, experts * rank, device=device) / (experts * rank) ** 0.5
    layer = FrozenMoloraLinear(base, router, a, b, experts, rank, scaling=2.0, gate=gate)
    exact = FrozenMoloraLinear(nn.Linear(d_in, d_out, bias=False, device=device, dtype=torch.float32), router, a, b,
                               experts, rank, scaling=2.0, gate=gate)
    exact.base.weight.data.copy_(base.weight.float())
    return layer, exact


def graph_us(fn, x) -> float:
    """GPU time of one call of ``fn(x)``: ``REPLAYS`` calls captured in one CUDA graph, replayed, median of 5."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)  # compiles the Triton kernel and warms cuBLAS before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPLAYS):
            fn(x)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / REPLAYS)
    return sorted(times)[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    args = p.parse_args(argv)

    import torch

    from citi_engine.molora import fused
    from citi_engine.molora import layer as molora_layer

    if not torch.cuda.is_available() or not fused.AVAILABLE:
        print("needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, "cuda"
    rows_out: list[dict[str, Any]] = []
    with torch.inference_mode():
        for model, kind, d_in, d_out in SHAPES:
            for gate in ("softmax", "sigmoid"):
                layer, exact = build(d_in, d_out, args.experts, args.rank, gate, dtype, device)
                for rows in args.rows:
                    x = torch.randn(rows, d_in, device=device, dtype=dtype)
                    want = exact(x.float())
                    delta = (want - exact.base(x.float())).abs().max().item()
                    row: dict[str, Any] = {"model": model, "projection": kind, "d_in": d_in, "d_out": d_out,
                                           "gate": gate, "rows": rows, "delta_max": delta}
                    for way, on in (("four", False), ("fused", True)):
                        molora_layer.FUSED_DELTA = on
                        got = layer(x)
                        row[f"{way}_err"] = (got.float() - want).abs().max().item()
                        row[f"{way}_us"] = graph_us(layer, x)
                    row["base_us"] = graph_us(layer.base, x)
                    rows_out.append(row)
                    print(row, flush=True)
    doc = {"card": torch.cuda.get_device_name(0), "commit": commit(),
           "versions": versions(), "experts": args.experts, "rank": args.rank, "dtype": "bfloat16",
           "replays": REPLAYS, "rows": rows_out}
    write_results(args.out, "fused_check", doc, render)
    return 0


def render(doc: dict[str, Any]) -> str:
    lines = [f"# The adapter's delta fused into one kernel against its four kernels ({doc['card']})", "",
             f"`bench/fused_check.py`, commit {doc['commit']}, torch {doc['versions']['torch']}; bf16, "
             f"{doc['experts']} experts of rank {doc['rank']}, random weights. Error: the largest absolute difference "
             "from the same layer in fp32 (the delta's own largest value beside it). Time: one component's forward "
             f"(base matmul included) in a CUDA graph of {doc['replays']}, median of 5 replays; base: the base matmul "
             "alone.", "",
             "| model | projection | gate | rows | delta max | four err | fused err | base us | four us | fused us "
             "| adapter's cost, four / fused |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['model']} | {r['projection']} | {r['gate']} | {r['rows']} | {r['delta_max']:.3g} | "
                     f"{r['four_err']:.3g} | {r['fused_err']:.3g} | {r['base_us']:.1f} | {r['four_us']:.1f} | "
                     f"{r['fused_us']:.1f} | {r['four_us'] - r['base_us']:+.1f} / {r['fused_us'] - r['base_us']:+.1f} us |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
