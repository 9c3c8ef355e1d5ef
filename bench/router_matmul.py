"""The serving adapter's router-and-A matmul in several layouts, timed alone: which one the GPU handles best.

    python bench/router_matmul.py --out DIR          # on a GPU host, under a minute
    python bench/router_matmul.py --out DIR --cpu    # CPU check of the script

Why: in a 16-row decode step of the 1B shape with a CITI adapter (bench/results/inference_raw/serving1b_h100_s13/
serving_step, H100) the 23 router-and-A matmuls of ``FrozenMoloraLinear`` took 0.45 ms a step, against 0.085 ms
at one row: for (16 x 2048) @ (2048 x 37) cuBLAS chose a small-N kernel at 21 us a call where reading the
150 KB weight takes well under 1 us. That is half of what the adapter adds to a step, and the adapter's cost at 16
concurrent requests is the performance issue's last serving target missed.

For each input width of the 1B shape (2048, 8192) and SmolLM2's (576, 1536), with the adapter's N = num_experts + 1
+ num_experts * r output columns (37 for 4 experts of rank 8), at 1 and 16 rows (``--rows``), in bf16 on a GPU:

- ``linear``: ``F.linear(x, W)`` with W (N x K), what the serving layer does now;
- ``align16``, ``align64``: the same with W padded by zero rows to a multiple of 16 or 64
  (``citi_engine.molora.layer.ROUTER_ALIGN``), the extra columns never read;
- ``transposed``: ``x @ Wt`` with Wt (K x N) stored transposed (another operand layout for cuBLAS);
- ``swapped``: ``(W @ x^T)^T``, the product taken the other way round (N rows of output, one column a token), so
  the small dimension is the other operand's.

Each is captured in a CUDA graph of ``--calls`` back-to-back calls and replayed; the time is per call, the median
of ``--rounds`` replays; the kernel the profiler saw for one call is recorded beside it. Random weights and inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from provenance import commit, versions, write_results  # noqa: E402

LAYOUTS = ("linear", "align16", "align64", "transposed", "swapped")


def operand(layout: str, n: int, k: int, dtype, device: str):
    """The weight in ``layout`` and the call that multiplies an input by it (N output columns first)."""
    import torch
    import torch.nn.functional as F

    w = torch.randn(n, k, dtype=dtype, device=device) * k ** -0.5
    if layout == "transposed":
        wt = w.t().contiguous()
        return lambda x: x @ wt
    if layout == "swapped":
        return lambda x: (w @ x.t()).t()
    align = {"linear": 1, "align16": 16, "align64": 64}[layout]
    pad = -n % align
    padded = torch.cat([w, w.new_zeros(pad, k)]) if pad else w
    return lambda x: F.linear(x, padded)


def time_layout(call, x, calls: int, rounds: int, device: str) -> float:
    """Microseconds a call: a CUDA graph of ``calls`` calls replayed ``rounds`` times (eager loops off a GPU)."""
    import torch

    if device != "cuda":
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                call(x)
            times.append((time.perf_counter() - start) / calls * 1e6)
        return statistics.median(times)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call(x)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def kernel_of(call, x, device: str) -> str:
    """The name of the GPU kernel that took longest in one call ('' off a GPU)."""
    if device != "cuda":
        return ""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call(x)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    if not kernels:
        return ""
    return max(kernels, key=lambda e: e.self_device_time_total).key[:80]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for router_matmul.json and .md")
    p.add_argument("--cpu", action="store_true", help="run on the CPU in fp32 (a check of the script)")
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--widths", type=lambda s: [int(x) for x in s.split(",")], default=[576, 1536, 2048, 8192])
    p.add_argument("--outputs", type=int, default=37, help="N: num_experts + 1 + num_experts * r (37: 4 x rank 8)")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    doc: dict[str, Any] = {"card": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "device": device,
                           "dtype": str(dtype).removeprefix("torch."), "outputs": args.outputs, "calls": args.calls,
                           "rounds": args.rounds, "commit": commit(), "versions": versions(), "results": []}
    torch.manual_seed(0)
    for k in args.widths:
        for rows in args.rows:
            x = torch.randn(rows, k, dtype=dtype, device=device)
            reference = None
            for layout in LAYOUTS:
                torch.manual_seed(k)  # the same weight for every layout
                call = operand(layout, args.outputs, k, dtype, device)
                out = call(x)[:, : args.outputs].float()
                reference = out if reference is None else reference
                row = {"width": k, "rows": rows, "layout": layout,
                       "us_per_call": round(time_layout(call, x, args.calls, args.rounds, device), 3),
                       "kernel": kernel_of(call, x, device),
                       "max_abs_diff_vs_linear": float((out - reference).abs().max())}
                doc["results"].append(row)
                print(row, flush=True)
    write_results(args.out, "router_matmul", doc, render)
    return 0


def render(doc: dict[str, Any]) -> str:
    lines = [f"# The router-and-A matmul by layout ({doc['card']}, {doc['dtype']})", "",
             f"`bench/router_matmul.py`, commit {doc['commit']}, torch {doc['versions'].get('torch')}; "
             f"N = {doc['outputs']} output columns; {doc['calls']} calls back to back (one CUDA graph on a GPU), "
             f"median of {doc['rounds']} rounds; microseconds a call.", "",
             "| width K | rows | layout | us a call | kernel | max diff to linear |",
             "|---:|---:|---|---:|---|---:|"]
    for r in doc["results"]:
        lines.append(f"| {r['width']} | {r['rows']} | {r['layout']} | {r['us_per_call']:.2f} | {r['kernel'] or '-'} | "
                     f"{r['max_abs_diff_vs_linear']:.2g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
