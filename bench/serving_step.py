"""One decode step of the serving runtime taken apart: the GPU's time, the host's time, and the kernels, at 1 and 16 rows.

    python bench/serving_step.py --shape 1b --out DIR            # on a GPU host, about a minute
    python bench/serving_step.py --tiny --out DIR                # CPU check of the script

Why: with CUDA graphs the 1B shape decodes a token in 2.97 ms alone and 4.68 ms a request at 16 concurrent
(bench/results/inference.md), although one step reads the weights once for all rows. This script says where the
step's time goes, without the scheduler around it. For each attention (``grouped``: the static modes' decode attention,
``citi_engine.decode_attention``; ``sdpa``: transformers' own, which copies keys and values per query head), with
the base model and with a CITI adapter swapped in, and for each row count, over a static KV cache of prompt +
``--steps`` columns (``citi_engine.static_decode.StaticDecoder``, graphs captured on a GPU):

- ``step_ms``: what the serving loop pays a step on the device side: read the greedy tokens back
  (``argmax().tolist()``, which waits for the GPU), feed them, replay the graph (``StaticDecoder.step``);
- ``replay_ms``: the graph replayed back to back without reading anything back: the GPU's own time a step;
- ``host_ms``: the difference, the part of a step in which the GPU waits on the host.

With ``--profile`` the torch profiler's kernel table of a few eager steps (graphs off: the same kernels, each
launched) is written for each row count, sorted by GPU time, into ``DIR/serving_step_<variant>_<rows>.txt``.
Random weights and random prompt ids: timings only, no text.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from inference import add_adapter_layout_args, apply_adapter_layout, build_random, make_adapter  # noqa: E402
from provenance import commit, versions, write_results  # noqa: E402

from citi_engine.molora import fused  # noqa: E402


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_step(model, rows: int, prompt: int, steps: int, rounds: int, device: str,
              compiled: bool = False) -> dict[str, float]:
    """Median over ``rounds`` of the per-step times of ``steps`` decode steps (see the module's text)."""
    import torch

    from citi_engine.static_decode import StaticDecoder

    g = torch.Generator().manual_seed(rows)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (rows, prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    stepped, replayed = [], []
    for _ in range(rounds):
        decoder = StaticDecoder(model, ids, mask, 2 * steps + 4, graphs=device == "cuda", compiled=compiled)
        with torch.no_grad():
            logits = decoder.prefill(0)
            for _ in range(3):  # eager warm-up, capture, first replay
                logits = decoder.step(logits.argmax(-1).tolist())
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                logits = decoder.step(logits.argmax(-1).tolist())
            _sync(device)
            stepped.append((time.perf_counter() - start) / steps * 1000)
            if decoder.graph is not None:
                start = time.perf_counter()
                for _ in range(steps):
                    decoder.graph.replay()
                _sync(device)
                replayed.append((time.perf_counter() - start) / steps * 1000)
    out = {"step_ms": round(statistics.median(stepped), 4)}
    if replayed:
        out["replay_ms"] = round(statistics.median(replayed), 4)
        out["host_ms"] = round(out["step_ms"] - out["replay_ms"], 4)
    return out


def kernel_table(model, rows: int, prompt: int, device: str, steps: int = 5, top: int = 30) -> str:
    """The profiler's table of ``steps`` eager decode steps at ``rows`` rows, by GPU time (CPU time off a GPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from citi_engine.static_decode import StaticDecoder

    ids = torch.randint(5, model.config.vocab_size, (rows, prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    decoder = StaticDecoder(model, ids, torch.ones_like(ids), steps + 2, graphs=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.no_grad():
        logits = decoder.prefill(0)
        logits = decoder.step(logits.argmax(-1).tolist())
        _sync(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                logits = decoder.step(logits.argmax(-1).tolist())
            _sync(device)
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=top)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--shape", help="random-weight model shape of bench/throughput.py (e.g. 1b)")
    what.add_argument("--tiny", action="store_true", help="CPU check with a tiny random model")
    p.add_argument("--out", type=Path, required=True, help="folder for serving_step.json, .md and kernel tables")
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--prompt", type=int, default=362, help="prompt tokens a row (the inference benchmark's 362)")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed a round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also write the kernel tables of eager steps")
    add_adapter_layout_args(p)
    p.add_argument("--compiled", action="store_true",
                   help="the step compiled by torch.compile before it is captured (CITI_INFERENCE_DECODE=compiled_graphs)")
    args = p.parse_args(argv)

    import torch

    from citi_engine import static_decode
    from worker.inference.cache import ModelCache, ServedModel

    apply_adapter_layout(args)

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    cache = ModelCache(device=device, adapter_cache_size=1)
    if args.tiny:
        from citi_engine.testing import make_tiny_model_dir

        spec = make_tiny_model_dir(Path(tempfile.mkdtemp(prefix="citi-bench-")) / "tiny")
        base = cache.base(spec)
        shape = "tiny"
    else:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        spec, shape = f"random-{args.shape}", args.shape
        base = cache.add_base(spec, build_random(args.shape, device, dtype, min_vocab=0), None)
    model = base.model
    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "card": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "device": device, "shape": shape,
        "params": sum(p.numel() for p in model.parameters()), "heads": model.config.num_attention_heads,
        "kv_heads": model.config.num_key_value_heads, "prompt_tokens": args.prompt, "steps": args.steps,
        "rounds": args.rounds, "compiled": args.compiled, "router_align": args.router_align,
        "one_row_reductions": args.one_row_reductions, "shared_input_groups": args.shared_input_groups,
        "fused_delta": args.fused_delta == "on" and fused.AVAILABLE,
        "commit": commit(),
        "versions": versions(), "results": {}}
    with tempfile.TemporaryDirectory(prefix="citi-bench-adapter-") as tmp:
        doc["adapter"] = make_adapter(model, Path(tmp) / "adapter", spec, args.molora_fraction)
        served = cache.adapter("bench", Path(tmp) / "adapter", spec)
        for attention in ("grouped", "sdpa"):
            static_decode.GROUPED_ATTENTION = attention == "grouped"
            for variant, which in (("base", ServedModel(base=base)), ("citi", served)):
                cache.activate(which)
                for rows in args.rows:
                    r = time_step(model, rows, args.prompt, args.steps, args.rounds, device, compiled=args.compiled)
                    doc["results"].setdefault(attention, {}).setdefault(variant, {})[str(rows)] = r
                    print(attention, variant, rows, r, flush=True)
                    if args.profile:
                        table = kernel_table(model, rows, args.prompt, device)
                        (args.out / f"serving_step_{attention}_{variant}_{rows}.txt").write_text(table)
        cache.activate(ServedModel(base=base))
        static_decode.GROUPED_ATTENTION = True
    write_results(args.out, "serving_step", doc, render)
    return 0


def render(doc: dict[str, Any]) -> str:
    way = ", step compiled by torch.compile" if doc.get("compiled") else ""
    if doc.get("router_align", 1) > 1:
        way += f", adapter's router rows aligned to {doc['router_align']}"
    if doc.get("one_row_reductions"):
        way += ", one-row adapter as reductions"
    if doc.get("fused_delta"):
        way += ", adapter delta fused (one Triton kernel)"
    lines = [f"# One decode step taken apart ({doc['shape']} shape, {doc['card']}{way})", "",
             f"`bench/serving_step.py`, commit {doc['commit']}, torch {doc['versions']['torch']}, transformers "
             f"{doc['versions']['transformers']}; {doc['params'] / 1e6:.0f}M parameters, {doc['heads']} query heads "
             f"over {doc['kv_heads']} key/value heads; prompt {doc['prompt_tokens']} tokens a row, static KV cache; "
             f"median over {doc['rounds']} rounds of {doc['steps']} steps. step: tokens read back, fed, graph "
             "replayed (the serving loop's device side); replay: the graph alone, back to back (the GPU's time); "
             "host: the difference.", "",
             "| attention | model | rows | step ms | replay ms | host ms |", "|---|---|---:|---:|---:|---:|"]
    for attention, variants in doc["results"].items():
        for variant, by_rows in variants.items():
            for rows, r in by_rows.items():
                replay = f"{r['replay_ms']:.3f}" if "replay_ms" in r else "n/a"
                host = f"{r['host_ms']:.3f}" if "host_ms" in r else "n/a"
                lines.append(f"| {attention} | {variant} | {rows} | {r['step_ms']:.3f} | {replay} | {host} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
