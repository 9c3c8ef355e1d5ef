"""Peak memory of evaluation's generation path: whole prompts in one prefill forward against chunked prefill.

    python bench/gen_memory.py --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT/mem   # GPU: SmolLM2, bf16
    python bench/gen_memory.py --shape smollm2-135m --out $OUT/mem   # GPU without the file: its shape, random weights
    python bench/gen_memory.py --tiny --out /tmp/mem                                          # CPU check
    python bench/gen_memory.py --merge $OUT/mem --md bench/results/gen_memory.md --json bench/results/gen_memory.json

What runs is :func:`citi_engine.generate.generate_ids`, greedy, one batch: the path of ``citi eval``'s tool
eval, the quality benchmark's tool eval and the retention probes (``generate_chat`` renders the chat and
calls it). Each prompt length P runs under every ``--chunks`` setting: ``0`` feeds whole prompts in one
forward (the path before chunked prefill), ``auto`` is ``generate_ids``'s default
(:func:`~citi_engine.generate.prefill_chunk_for` the batch), a number is that many prompt tokens a row per
forward. The replies of every setting are compared token for token with those of ``0``.

Prompts: chat prompts offering many tool schemas (the engine's template), each cut to its last tokens; the
longest row of a batch has P tokens and the others are spread down to P/2, so the batch is left-padded as it
is in evaluation (padding is what makes one-shot prefill build a dense mask).

Measured per configuration: on CUDA, ``torch.cuda.max_memory_allocated`` over the call (peak statistics reset
before it) minus what was allocated before it (the weights), all in one process; on CPU, one subprocess per
configuration, its peak resident memory over the call (``/proc/self/clear_refs`` resets the peak) minus its
resident memory before. Also the wall time of the call and the KV cache's own size at the end
(layers x 2 x key/value heads x head size x batch x (P + new tokens)), the floor of any path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from provenance import commit  # noqa: E402

GIB = 1024**3
# SmolLM2-135M-Instruct's architecture, for --shape runs where the GGUF file is not at hand.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
                     "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192},
}
GPU_DEFAULTS = {"prompt_tokens": "512,2048,4096", "batch": 64, "new_tokens": 32, "chunks": "0,auto"}
CPU_DEFAULTS = {"prompt_tokens": "256,1024,2048", "batch": 8, "new_tokens": 4, "chunks": "0,auto,128"}


# ------------------------------------------------------------------------------------------------
# Setup


def load(args) -> tuple[Any, Any, dict[str, Any]]:
    """The model (eval mode, on its device) and tokenizer of this run, and what to record about them."""
    import torch

    from citi_engine.models import load_model

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.gguf:
        model, tok = load_model(args.gguf, device=device, dtype="bf16" if device == "cuda" else "fp32")
        info = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"}
    elif args.shape:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from citi_engine.testing import smollm2_tokenizer_dir

        tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
        config = LlamaConfig(**SHAPES[args.shape], attn_implementation="sdpa", pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
        info = {"model": f"{args.shape}-shaped Llama, random weights"}
    else:
        from citi_engine.testing import make_tiny_model_dir

        model_dir = args.model_dir or make_tiny_model_dir(Path(tempfile.mkdtemp(prefix="citi-genmem-")) / "tiny")
        args.model_dir = model_dir
        model, tok = load_model(model_dir, device="cpu", dtype="fp32")
        info = {"model": "tiny random Llama (2 layers, hidden 64) - CPU check only"}
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    info.update(params=sum(p.numel() for p in model.parameters()), layers=c.num_hidden_layers,
                heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=head_dim,
                dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                attention=getattr(c, "_attn_implementation", None), device=device)
    return model, tok, info


def make_prompts(tokenizer, longest: int, batch: int) -> list[list[int]]:
    """``batch`` different chat prompts offering many tools, cut to lengths spread from ``longest`` down to half."""
    from citi_engine.generate import encode_prompt

    lengths = [longest - (longest // 2) * i // max(1, batch - 1) for i in range(batch)]
    prompts = []
    for i, n in enumerate(lengths):
        tools, ids = [], []
        while len(ids) < n:  # add tools until the rendered prompt is long enough, then keep its last n tokens
            tools += [_tool(i, k) for k in range(len(tools), len(tools) + 8)]
            messages = [{"role": "system", "content": "You call tools when they help."},
                        {"role": "user", "content": f"Request {i}: what is the status of order {1000 + i}?"}]
            ids = encode_prompt(tokenizer, messages, tools)
        prompts.append(ids[-n:])
    return prompts


def _tool(row: int, k: int) -> dict:
    return {"type": "function", "function": {
        "name": f"tool_{row}_{k}", "description": f"Look up record {k} of kind {row % 7} in the system.",
        "parameters": {"type": "object", "properties": {
            "record_id": {"type": "string", "description": "Identifier of the record, e.g. R-12345"},
            "fields": {"type": "array", "items": {"type": "string"}, "description": "Fields to return"},
            "limit": {"type": "integer", "minimum": 1}}, "required": ["record_id"]}}}


def kv_cache_bytes(info: dict[str, Any], batch: int, tokens: int) -> int:
    """Bytes of a full KV cache of ``batch`` rows of ``tokens`` tokens."""
    width = 2 if info["dtype"] in ("bfloat16", "float16") else 4
    return info["layers"] * 2 * info["kv_heads"] * info["head_dim"] * width * batch * tokens


# ------------------------------------------------------------------------------------------------
# Measurement


def _chunk_arg(chunk: str) -> int | None:
    return None if chunk == "auto" else int(chunk)


def generate_once(model, tok, prompts, chunk: str, new_tokens: int) -> list[list[int]]:
    from citi_engine.generate import generate_ids

    gens = generate_ids(model, tok, prompts, max_new_tokens=new_tokens, batch_size=len(prompts),
                        prefill_chunk=_chunk_arg(chunk), parse=False)
    return [g.completion_ids for g in gens]


def measure_cuda(model, tok, prompts, chunk: str, new_tokens: int) -> dict[str, Any]:
    """Peak CUDA memory of one generate_ids call above what was allocated before it."""
    import gc

    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    try:
        ids = generate_once(model, tok, prompts, chunk, new_tokens)
    except torch.cuda.OutOfMemoryError:
        ids = None  # the peak so far is still a reading: at least this much was asked for
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated()
    gc.collect()  # after the except block, so the failed call's tensors are unreferenced
    torch.cuda.empty_cache()
    return {"oom": ids is None, "peak_bytes": peak - before, "peak_total_bytes": peak,
            "seconds": None if ids is None else round(seconds, 3), "completion_ids": ids}


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_cpu_child(args) -> dict[str, Any]:
    """One configuration in this (fresh) process: peak resident memory over the call above the memory before."""
    model, tok, _ = load(args)
    prompts = make_prompts(tok, args.one_prompt_tokens, args.batch)
    generate_once(model, tok, prompts[:2], args.one_chunk, 2)  # warm-up: first-call allocations are not the path's
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets the peak resident size (VmHWM) to the current one
    before = _rss()
    t = time.perf_counter()
    ids = generate_once(model, tok, prompts, args.one_chunk, args.new_tokens)
    seconds = time.perf_counter() - t
    peak = _peak_rss()
    return {"oom": False, "peak_bytes": peak - before, "peak_total_bytes": peak, "seconds": round(seconds, 3),
            "completion_ids": ids}


def measure_cpu(args, prompt_tokens: int, chunk: str) -> dict[str, Any]:
    """One configuration in a subprocess of its own (see :func:`measure_cpu_child`)."""
    if args.gguf:
        model = ["--gguf", args.gguf]
    elif args.shape:
        model = ["--shape", args.shape]
    else:
        model = ["--tiny", "--model-dir", args.model_dir]
    cmd = [sys.executable, str(Path(__file__).resolve()), *model, "--child", "--one-prompt-tokens", str(prompt_tokens),
           "--one-chunk", chunk, "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
    # A fixed mmap threshold: glibc returns every large block to the system when it is freed, so the peak
    # resident size follows the tensors alive rather than what the allocator keeps for reuse.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"configuration P={prompt_tokens} chunk={chunk} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args) -> dict[str, Any]:
    import torch
    import transformers

    from citi_engine.generate import prefill_chunk_for

    model, tok, info = load(args)
    cuda = info["device"] == "cuda"
    if cuda:
        generate_once(model, tok, make_prompts(tok, 64, 2), "0", 2)  # warm-up: cuBLAS workspace, kernels
    result: dict[str, Any] = {
        "tag": "tiny" if args.tiny else ("smollm2" if args.gguf else f"random-{args.shape}"),
        "card": torch.cuda.get_device_name(0) if cuda else "cpu", "model": info, "argv": sys.argv[1:],
        "commit": commit(), "batch": args.batch, "new_tokens": args.new_tokens,
        "auto_chunk": prefill_chunk_for(args.batch),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0], "cuda": str(torch.version.cuda)},
        "measure": "torch.cuda.max_memory_allocated" if cuda else "peak RSS of a subprocess per configuration",
        "results": [],
    }
    for p in args.prompt_tokens:
        prompts = make_prompts(tok, p, args.batch)
        one_shot = None
        for chunk in args.chunks:
            r = measure_cuda(model, tok, prompts, chunk, args.new_tokens) if cuda else measure_cpu(args, p, chunk)
            ids = r.pop("completion_ids", None)
            if chunk == "0":
                one_shot = ids
            r.update(prompt_tokens=p, chunk=chunk,
                     chunk_tokens=prefill_chunk_for(args.batch) if chunk == "auto" else int(chunk),
                     kv_cache_bytes=kv_cache_bytes(info, args.batch, p + args.new_tokens),
                     same_replies_as_one_shot=None if ids is None or one_shot is None else ids == one_shot)
            if ids is not None and one_shot is not None:
                r["rows_differing"] = sum(a != b for a, b in zip(ids, one_shot, strict=True))
            result["results"].append(r)
            print(json.dumps({k: r.get(k) for k in ("prompt_tokens", "chunk", "oom", "seconds",
                                                    "same_replies_as_one_shot")}
                             | {"peak_gib": round(r["peak_bytes"] / GIB, 3),
                                "kv_cache_gib": round(r["kv_cache_bytes"] / GIB, 3)}), flush=True)
    return result


# ------------------------------------------------------------------------------------------------
# Report


def merge(dirs: list[Path], md: Path, js: Path) -> None:
    """Collect the runs' JSON files into one JSON and a Markdown table."""
    runs = [json.loads(f.read_text()) for d in dirs for f in sorted(Path(d).glob("gen_memory_*.json"))]
    if not runs:
        raise SystemExit(f"no gen_memory_*.json in {', '.join(map(str, dirs))}")
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    lines = ["# Generation memory: one-shot prefill against chunked prefill", "",
             "Written by `bench/gen_memory.py --merge`. Greedy `generate_ids` on one left-padded batch of chat "
             "prompts with many tool schemas (the longest row P tokens, the others down to P/2). Chunk 0 feeds "
             "whole prompts in one forward (the path before); `auto` is the default chunk for the batch. Peak: "
             "above the memory before the call (the weights). KV cache: its own size at the end, the floor of "
             "any path. 'same replies': every row's greedy tokens equal those of chunk 0.", ""]
    for run in runs:
        m, v = run["model"], run["versions"]
        commit = run.get("commit") or "unknown"
        commit = commit[:10] + ("+dirty" if commit.endswith("+dirty") else "")
        lines += [f"## {m['model']} on {run['card']}", "",
                  f"{m['params'] / 1e6:.0f}M parameters, {m['layers']} layers, {m['heads']} heads "
                  f"({m['kv_heads']} key/value), {m['dtype']}, attention {m['attention']}; batch {run['batch']}, "
                  f"{run['new_tokens']} new tokens; `auto` = {run['auto_chunk']} tokens a row; torch {v['torch']}, "
                  f"transformers {v['transformers']}; commit {commit}. Measured: {run['measure']}.", "",
                  "| prompt tokens | prefill chunk | peak GiB | peak / KV cache | KV cache GiB | seconds | "
                  "same replies |", "|---:|---|---:|---:|---:|---:|---|"]
        for r in run["results"]:
            peak = f"{r['peak_bytes'] / GIB:.3f}" + (" (out of memory)" if r["oom"] else "")
            same = {None: "-", True: "yes", False: f"no ({r.get('rows_differing')} rows)"}[r["same_replies_as_one_shot"]]
            lines.append(f"| {r['prompt_tokens']} | {r['chunk']} ({r['chunk_tokens'] or 'whole'}) | {peak} | "
                         f"{r['peak_bytes'] / r['kv_cache_bytes']:.1f} | {r['kv_cache_bytes'] / GIB:.3f} | "
                         f"{r.get('seconds') or '-'} | {same} |")
        lines.append("")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (the base model, bf16 on GPU)")
    what.add_argument("--shape", choices=sorted(SHAPES), help="a model of this shape with random weights")
    what.add_argument("--tiny", action="store_true", help="CPU check with a tiny random model")
    what.add_argument("--merge", nargs="+", type=Path, help="directories of run JSONs to merge")
    parser.add_argument("--out", type=Path, help="directory for gen_memory_<tag>.json")
    parser.add_argument("--prompt-tokens", help="longest prompt of the batch, comma-separated "
                        f"(default {GPU_DEFAULTS['prompt_tokens']}; --tiny {CPU_DEFAULTS['prompt_tokens']})")
    parser.add_argument("--batch", type=int, help=f"prompts in the batch (default {GPU_DEFAULTS['batch']}; "
                        f"--tiny {CPU_DEFAULTS['batch']})")
    parser.add_argument("--new-tokens", type=int, help=f"tokens generated a row (default {GPU_DEFAULTS['new_tokens']}; "
                        f"--tiny {CPU_DEFAULTS['new_tokens']})")
    parser.add_argument("--chunks", help="prefill chunk settings, comma-separated: 0 (one forward), auto, or tokens "
                        f"(default {GPU_DEFAULTS['chunks']}; --tiny {CPU_DEFAULTS['chunks']})")
    parser.add_argument("--md", type=Path, default=ROOT / "bench" / "results" / "gen_memory.md")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gen_memory.json")
    # internal: one CPU configuration in a subprocess
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--one-prompt-tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-chunk", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, args.md, args.json)
        print(f"wrote {args.md} and {args.json}")
        return
    defaults = CPU_DEFAULTS if args.tiny else GPU_DEFAULTS
    args.prompt_tokens = [int(x) for x in (args.prompt_tokens or defaults["prompt_tokens"]).split(",")]
    args.batch = args.batch or defaults["batch"]
    args.new_tokens = args.new_tokens or defaults["new_tokens"]
    args.chunks = (args.chunks or defaults["chunks"]).split(",")
    if "0" in args.chunks:  # the one-shot baseline first, so every other setting is compared with it
        args.chunks = ["0"] + [c for c in args.chunks if c != "0"]
    if args.child:
        print(json.dumps(measure_cpu_child(args)))
        return
    if args.out is None:
        parser.error("--out is required for a run")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gen_memory_{result['tag']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
