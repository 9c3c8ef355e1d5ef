"""Inference speed of the inference server's runtime: base model against a CITI adapter on the same base.

    python bench/inference.py --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT/inf   # GPU: SmolLM2
    python bench/inference.py --shape 1b --tokenizer-gguf /path/SmolLM2...gguf --out $OUT/inf   # GPU: 1B, random
    python bench/inference.py --tiny --out /tmp/inf                                         # CPU check
    python bench/inference.py --merge $OUT/inf --md bench/results/inference.md --json bench/results/inference.json

What runs is the server's own path without HTTP (:mod:`worker.inference.cache`): the base model loaded
once in a :class:`ModelCache`, a real CITI adapter (``apply_method`` + ``save_adapter`` of the engine on
a copy of the base, experts with non-zero weights) loaded from its directory into the cache, requests
submitted to the :class:`BatchScheduler` (5 ms batching window, one generation thread), one at a time
(batch 1) and 16 at once. Every request gets the same chat prompt with two tools (rendered by the
engine's chat template, about 300 tokens) and generates ``--new-tokens`` tokens, end-of-turn ignored
so every request decodes the same length.

Measured per request: time to first token (from submission, so it includes the batching window, the
prefill and the first sampling step) and decode speed (tokens after the first over the time after the
first). Per configuration: the median over ``--rounds`` rounds, base and adapter rounds interleaved.
Also: plain transformers ``generate`` on the base model as a reference (:func:`measure_reference`), and
cold-load time of the adapter (files to a served, activatable adapter on the GPU, base already
loaded), and the time to swap it in and out.

Components of the adapter: MOLoRA on every fifth component from the first (20%), UCO on every tenth
from the third (10%), 4 experts of rank 8 as in bench/throughput.py: random weights make importance
meaningless, and speed depends only on how many components of which size are adapted.

Shapes: ``1b`` is Llama-3.2-1B's (hidden 2048, 16 layers, intermediate 8192, vocab 128256, tied
embeddings) with random bf16 weights; SmolLM2's tokenizer supplies the prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from provenance import commit, versions  # noqa: E402
from throughput import SHAPES, llama_config  # noqa: E402

from citi_engine import DECODE_MODES, resolve_decode  # noqa: E402

CITI = {"num_experts": 4, "rank": 8, "alpha": 16.0}
TARGET_OVERHEAD = 0.15

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search_flights", "description": "Search flights between two airports on a date.",
        "parameters": {"type": "object", "properties": {
            "origin": {"type": "string", "description": "IATA code of the departure airport"},
            "destination": {"type": "string", "description": "IATA code of the arrival airport"},
            "date": {"type": "string", "description": "Departure date, YYYY-MM-DD"},
            "passengers": {"type": "integer", "minimum": 1}}, "required": ["origin", "destination", "date"]}}},
]
MESSAGES = [
    {"role": "system", "content": "You are a travel assistant. Use the tools when they help."},
    {"role": "user", "content": "I fly from Berlin to Lisbon on 2025-06-14 with my partner. What will the weather "
     "be like in Lisbon, and which flights are there that morning?"},
]


# ------------------------------------------------------------------------------------------------
# Setup


def add_adapter_layout_args(parser: argparse.ArgumentParser) -> None:
    """How the served adapter's layers are laid out (``citi_engine.molora.layer``); :func:`apply_adapter_layout`."""
    parser.add_argument("--router-align", type=int, default=None,
                        help="pad the served adapter's router-and-A weight to a multiple of this many rows (default: "
                             "the engine's, citi_engine.molora.layer.ROUTER_ALIGN; 1: none; bench/router_matmul.py says why)")
    parser.add_argument("--one-row-reductions", action="store_true",
                        help="compiled one-row steps take the adapter as reductions "
                             "(citi_engine.molora.layer.ONE_ROW_REDUCTIONS, an experiment; off by default)")
    parser.add_argument("--shared-input-groups", action="store_true",
                        help="components that read the same input share one router-and-A matmul "
                             "(citi_engine.molora.layer.SHARED_INPUT_GROUPS, an experiment; off by default)")
    parser.add_argument("--fused-delta", choices=("on", "off"), default=None,
                        help="a decode step's adapter delta in one Triton kernel on a GPU "
                             "(citi_engine.molora.layer.FUSED_DELTA; default: the engine's) or in four")
    parser.add_argument("--molora-fraction", type=float, default=None,
                        help="share of the model's components that carry MOLoRA experts, spread evenly over the "
                             "layers (default: a job's, components.molora_fraction; before the fifteenth session the "
                             "benchmark used 0.2, every fifth component)")


def apply_adapter_layout(args: argparse.Namespace) -> None:
    """Set the serving layer's layout from :func:`add_adapter_layout_args`' flags; ``args.router_align`` then holds
    the padding used (the engine's default when not given), for the results."""
    from citi_engine.molora import layer as molora_layer
    from citi_engine.training.config import ComponentsConfig

    if args.router_align is None:
        args.router_align = molora_layer.ROUTER_ALIGN
    if args.molora_fraction is None:
        args.molora_fraction = ComponentsConfig().molora_fraction
    if args.fused_delta is None:
        args.fused_delta = "on" if molora_layer.FUSED_DELTA else "off"
    molora_layer.FUSED_DELTA = args.fused_delta == "on"
    molora_layer.ROUTER_ALIGN = args.router_align
    molora_layer.ONE_ROW_REDUCTIONS = args.one_row_reductions
    molora_layer.SHARED_INPUT_GROUPS = args.shared_input_groups


def spread_components(names: list[str], molora_fraction: float, uco_fraction: float) -> tuple[list[str], list[str]]:
    """MOLoRA on ``molora_fraction`` of ``names`` and UCO on ``uco_fraction`` (a job's counts), each spread evenly
    over the list (so over the layers), UCO among the rest. At 0.2 MOLoRA is every fifth component from the first."""
    from citi_engine.components import fraction_to_count

    n_molora = fraction_to_count(molora_fraction, len(names))
    molora = [names[i * len(names) // n_molora] for i in range(n_molora)]
    rest = [n for n in names if n not in set(molora)]
    n_uco = min(fraction_to_count(uco_fraction, len(names)), len(rest))
    uco = [rest[i * len(rest) // n_uco] for i in range(n_uco)]
    return molora, uco


def make_adapter(base_model, out_dir: Path, spec: str, molora_fraction: float | None = None) -> dict[str, Any]:
    """A CITI adapter for ``base_model`` written by the engine, with non-zero experts, on ``molora_fraction`` of
    its components (default: a job's) and UCO on a job's share; returns its sizes."""
    import torch

    from citi_engine.adapter import apply_method, save_adapter
    from citi_engine.components import list_components
    from citi_engine.training.config import ComponentsConfig

    work = copy.deepcopy(base_model)  # apply_method wraps in place; the served base must stay untouched
    defaults = ComponentsConfig()
    names = list_components(work)
    molora, uco = spread_components(names, molora_fraction or defaults.molora_fraction, defaults.uco_fraction)
    peft_model = apply_method(work, "citi", molora=molora, uco=uco, **CITI)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "molora_B" in name:  # B starts at zero; give the experts something to add
                p.copy_((torch.randn(p.shape, generator=gen) * 0.01).to(p.device, p.dtype))
    save_adapter(peft_model, out_dir, {"model": spec})
    del peft_model, work
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"molora": len(molora), "uco": len(uco), "components": len(names),
            "molora_fraction": molora_fraction or defaults.molora_fraction, **CITI,
            "bytes": (out_dir / "adapter_model.safetensors").stat().st_size}


def build_random(shape: str, device: str, dtype, min_vocab: int):
    """A model of ``shape`` with random weights on ``device``; the vocabulary grown to the tokenizer's if smaller."""
    import torch
    from transformers import AutoModelForCausalLM

    config = llama_config(shape)
    config.vocab_size = max(config.vocab_size, min_vocab)
    config.use_cache = True
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_base(args, cache) -> tuple[Any, str, dict[str, Any]]:
    """Load or build the base model into the cache; return (LoadedBase, spec, model info)."""
    import torch

    if args.gguf and not args.shape:
        spec = args.gguf
        base = cache.base(spec)
        info = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", "load_s": round(base.load_seconds, 2)}
    elif args.tiny:
        from citi_engine.testing import make_tiny_model_dir

        spec = make_tiny_model_dir(Path(tempfile.mkdtemp(prefix="citi-bench-")) / "tiny")
        base = cache.base(spec)
        info = {"model": "tiny random Llama (2 layers, hidden 64) - CPU check only"}
    else:
        from transformers import AutoTokenizer

        from citi_engine.models import load_tokenizer
        from citi_engine.specs import resolve_model_spec

        if args.tokenizer_gguf:
            tokenizer = load_tokenizer(resolve_model_spec(args.tokenizer_gguf))
        else:
            from citi_engine.testing import smollm2_tokenizer_dir

            tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        dtype = torch.bfloat16 if cache.device.startswith("cuda") else torch.float32
        model = build_random(args.shape, cache.device, dtype, min_vocab=len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        spec = f"random-{args.shape}"
        base = cache.add_base(spec, model, tokenizer)
        info = {"model": f"{args.shape}-shaped Llama, random weights", "shape": SHAPES[args.shape],
                "vocab_size": model.config.vocab_size}
    model = base.model
    info.update(params=sum(p.numel() for p in model.parameters()), layers=model.config.num_hidden_layers,
                hidden=model.config.hidden_size, dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    return base, spec, info


# ------------------------------------------------------------------------------------------------
# Measurement


async def _round(scheduler, served, prompt: list[int], n: int, new_tokens: int) -> list[Any]:
    from worker.inference.cache import GenerationRequest

    reqs = [GenerationRequest(prompt_ids=list(prompt), max_new_tokens=new_tokens, ignore_eos=True) for _ in range(n)]
    await asyncio.gather(*(scheduler.submit(served, r) for r in reqs))
    return reqs


def _round_ms_per_token(reqs: list[Any]) -> float:
    """Median over a round's requests of decode milliseconds per token (after the first token)."""
    return statistics.median((r.finished_at - r.submitted_at - r.time_to_first_token) * 1000 / (r.completion_tokens - 1)
                             for r in reqs)


def _summarise(rounds: list[list[Any]]) -> dict[str, Any]:
    ttft, decode, aggregate = [], [], []
    for reqs in rounds:
        start = min(r.submitted_at for r in reqs)
        end = max(r.finished_at for r in reqs)
        aggregate.append(sum(r.completion_tokens for r in reqs) / (end - start))
        for r in reqs:
            ttft.append(r.time_to_first_token)
            first = r.submitted_at + r.time_to_first_token
            decode.append((r.completion_tokens - 1) / (r.finished_at - first))
    med = statistics.median
    per_round = [_round_ms_per_token(reqs) for reqs in rounds]
    return {
        "ttft_ms": round(med(ttft) * 1000, 2),
        "ttft_ms_p90": round(sorted(ttft)[max(0, math.ceil(0.9 * len(ttft)) - 1)] * 1000, 2),
        "decode_tok_s_per_request": round(med(decode), 1),
        "ms_per_token": round(1000 / med(decode), 3),
        "ms_per_token_min_round": round(min(per_round), 3),
        "aggregate_tok_s": round(med(aggregate), 1),
        "requests": sum(len(r) for r in rounds),
        "rounds": len(rounds),
    }


async def measure(cache, base, served_adapter, prompt: list[int], args) -> tuple[dict[str, Any], dict[str, float]]:
    """Per variant and concurrency: the summary; and per concurrency the paired adapter overhead.

    Base and adapter rounds alternate; the overhead is the median over rounds of (adapter ms/token) /
    (the base ms/token of the round just before) - 1, so a slow drift of the host's speed cancels out.
    """
    from worker.inference.cache import BatchScheduler, ServedModel

    scheduler = BatchScheduler(cache, max_batch_size=16, max_wait_ms=args.wait_ms)
    variants = {"base": ServedModel(base=base), "citi": served_adapter}
    out: dict[str, Any] = {}
    paired: dict[str, float] = {}
    try:
        for concurrency in args.concurrency:
            n_rounds = args.rounds if concurrency == 1 else max(3, args.rounds // 2)
            rounds: dict[str, list] = {v: [] for v in variants}
            for served in variants.values():  # warm-up: kernels, allocator, first activation
                await _round(scheduler, served, prompt, concurrency, min(8, args.new_tokens))
            for _ in range(n_rounds):
                for name, served in variants.items():
                    rounds[name].append(await _round(scheduler, served, prompt, concurrency, args.new_tokens))
            for name in variants:
                out.setdefault(name, {})[str(concurrency)] = _summarise(rounds[name])
            ratios = [_round_ms_per_token(c) / _round_ms_per_token(b)
                      for b, c in zip(rounds["base"], rounds["citi"], strict=True)]
            paired[str(concurrency)] = round(statistics.median(ratios) - 1, 4)
    finally:
        await scheduler.close()
    return out, paired


def measure_reference(model, prompt: list[int], args) -> dict[str, Any]:
    """Plain transformers ``generate`` (greedy, dynamic cache, no scheduler) on the base model, as a reference.

    Per concurrency: the same prompt ``n`` times in one batch. TTFT is the median time of ``generate`` with one new
    token; ms per token is (time for ``--new-tokens`` - TTFT) / (new tokens - 1); medians over the rounds.
    """
    import torch

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def timed(ids: torch.Tensor, new_tokens: int) -> float:
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        sync()
        return time.perf_counter() - t

    out: dict[str, Any] = {}
    for n in args.concurrency:
        ids = torch.tensor([prompt] * n, device=device)
        timed(ids, min(8, args.new_tokens))  # warm-up
        n_rounds = args.rounds if n == 1 else max(3, args.rounds // 2)
        first = statistics.median(timed(ids, 1) for _ in range(n_rounds))
        full = statistics.median(timed(ids, args.new_tokens) for _ in range(n_rounds))
        per_token = (full - first) / max(1, args.new_tokens - 1)
        out[str(n)] = {"ttft_ms": round(first * 1000, 2), "ms_per_token": round(per_token * 1000, 3),
                       "aggregate_tok_s": round(n * args.new_tokens / full, 1), "rounds": n_rounds}
    return out


def run_one(args) -> dict[str, Any]:
    import torch

    from citi_engine.data.chat_format import render_prompt
    from worker.inference.cache import ModelCache, ServedModel

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    args.decode = resolve_decode(args.decode, device)  # the loop that runs, in the tag and the record
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    cache = ModelCache(device=device, adapter_cache_size=2, decode=args.decode)
    t0 = time.perf_counter()
    base, spec, info = load_base(args, cache)
    from citi_engine import static_decode

    static_decode.GROUPED_ATTENTION = args.attention == "grouped"  # sdpa: the static modes' attention before
    apply_adapter_layout(args)
    tag = "tiny" if args.tiny else (f"random-{args.shape}" if args.shape else "smollm2")
    tag += "" if args.decode == "dynamic" else f"-{args.decode}"
    tag += "" if args.attention == "grouped" else f"-{args.attention}"
    tag += "" if args.router_align == 1 else f"-align{args.router_align}"
    tag += "-onerow" if args.one_row_reductions else ""
    tag += "-groups" if args.shared_input_groups else ""
    from citi_engine.molora import fused

    fused_delta = args.fused_delta == "on" and device == "cuda" and fused.AVAILABLE  # what the layers will do
    tag += "-fused" if fused_delta else ""
    tag += f"-molora{args.molora_fraction:g}"  # the adapter's share of components: its cost grows with it
    result: dict[str, Any] = {"tag": tag, "card": card, "device": device, "model": info, "argv": sys.argv[1:],
                              "commit": commit(), "versions": versions(), "new_tokens": args.new_tokens,
                              "rounds": args.rounds, "batch_wait_ms": args.wait_ms, "decode": args.decode,
                              "attention": "sdpa" if args.decode == "dynamic" else args.attention,
                              "router_align": args.router_align, "one_row_reductions": args.one_row_reductions,
                              "shared_input_groups": args.shared_input_groups,
                              "fused_delta": fused_delta}
    prompt_text = render_prompt(base.tokenizer, MESSAGES, TOOLS)
    prompt = base.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    result["prompt_tokens"] = len(prompt)

    with tempfile.TemporaryDirectory(prefix="citi-bench-adapter-") as tmp:
        adapter_dir = Path(tmp) / "adapter"
        result["adapter"] = make_adapter(base.model, adapter_dir, spec, args.molora_fraction)
        loads = []
        for i in range(3):  # cold each time: a new id is a cache miss
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            served = cache.adapter(f"bench-{i}", adapter_dir, spec)
            if device == "cuda":
                torch.cuda.synchronize()
            loads.append(time.perf_counter() - t)
        result["adapter_cold_load_s"] = round(statistics.median(loads), 4)
        result["adapter_cold_load_s_all"] = [round(x, 4) for x in loads]
        swaps = []
        for _ in range(20):
            t = time.perf_counter()
            cache.activate(served)
            cache.activate(ServedModel(base=base))
            swaps.append(time.perf_counter() - t)
        result["adapter_swap_in_out_ms"] = round(statistics.median(swaps) * 1000, 3)
        result["setup_s"] = round(time.perf_counter() - t0, 1)
        result["results"], result["adapter_overhead"] = asyncio.run(measure(cache, base, served, prompt, args))
        cache.activate(ServedModel(base=base))
        result["reference_hf_generate"] = measure_reference(base.model, prompt, args)
        if args.decode != "dynamic":
            result["same_replies_as_dynamic"] = compare_replies(cache, base, served, args.decode)
            cache.activate(ServedModel(base=base))

    result["fused_delta"] = result["fused_delta"] and fused.AVAILABLE  # false if the kernel failed and gave way
    b1 = result["adapter_overhead"].get("1")
    result["adapter_overhead_batch1"] = b1
    result["target_met"] = None if b1 is None else b1 <= TARGET_OVERHEAD
    return result


def compare_replies(cache, base, served, decode: str, n: int = 16, new_tokens: int = 64) -> dict[str, Any]:
    """Greedy replies to ``n`` different prompts (general probes, some with the benchmark's tools offered), one
    batch, under ``decode`` and under the dynamic KV cache, for the base and the adapter: the share of replies
    that are the same token for token (the mode may become the server's default only if they are)."""
    from citi_engine.data.prompts import PROBE_PROMPTS
    from citi_engine.generate import encode_prompt
    from citi_engine.serving import GenerationRequest, generate
    from worker.inference.cache import ServedModel

    tok = base.tokenizer
    prompts = [encode_prompt(tok, [{"role": "user", "content": p}], TOOLS if i % 2 else None)
               for i, p in enumerate(PROBE_PROMPTS[:n])]
    out: dict[str, Any] = {"prompts": len(prompts), "new_tokens": new_tokens}
    for name, model in (("base", ServedModel(base=base)), ("citi", served)):
        cache.activate(model)
        texts = {}
        for mode in ("dynamic", decode):
            reqs = [GenerationRequest(prompt_ids=p, max_new_tokens=new_tokens) for p in prompts]
            generate(base.model, tok, reqs, decode=mode)
            texts[mode] = [r.text for r in reqs]
        same = sum(a == b for a, b in zip(texts["dynamic"], texts[decode], strict=True))
        out[name] = round(same / len(prompts), 4)
        out[f"{name}_first_difference"] = next(
            ({"prompt": i, "dynamic": a[:200], decode: b[:200]}
             for i, (a, b) in enumerate(zip(texts["dynamic"], texts[decode], strict=True)) if a != b), None)
    print(f"same greedy replies as the dynamic cache ({decode}): base {out['base']:.0%}, adapter {out['citi']:.0%}",
          flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# Report


def merge(dirs: list[Path], md: Path, js: Path, notes: Path | None = None) -> None:
    """Collect the runs' JSON files into one JSON and a Markdown table (``notes``: a Markdown file appended)."""
    runs = []
    for d in dirs:
        for f in sorted(Path(d).glob("inference_*.json")):
            runs.append(json.loads(f.read_text()))
    if not runs:
        raise SystemExit(f"no inference_*.json in {', '.join(map(str, dirs))}")
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    lines = ["# Inference: base model against a CITI adapter", "",
             "Written by `bench/inference.py --merge` from the runs below; every number of one run comes from one "
             "process on one card. Decode speed is per request (tokens after the first over the time after the "
             "first); TTFT counts from submission (5 ms batching window, prefill, first token); aggregate is all "
             "tokens of a round over its wall time. Medians over the rounds; base and adapter rounds alternate. The "
             "adapter's cost is the median over rounds of its ms/token over the base's in the round before (runs "
             "that predate paired rounds: the ratio of the two medians). Target: a CITI adapter costs at most "
             f"{TARGET_OVERHEAD:.0%} more per token than the base model at batch 1.", ""]
    for run in runs:
        m = run["model"]
        a = run["adapter"]
        commit = run.get("commit") or ""
        commit = commit[:10] if commit and commit != "HEAD" else "unknown"
        decode = run.get("decode", "dynamic")
        attention = run.get("attention")  # runs before grouped decode attention did not record it
        align = run.get("router_align", 1)
        lines += [f"## {m['model']} on {run['card']}, commit {commit}"
                  + ("" if decode == "dynamic" else f", decode {decode}")
                  + (f", attention {attention}" if attention else "")
                  + (f", router rows aligned to {align}" if align > 1 else "")
                  + (", one-row adapter as reductions" if run.get("one_row_reductions") else "")
                  + (", shared-input groups" if run.get("shared_input_groups") else "")
                  + (", adapter delta fused (one Triton kernel)" if run.get("fused_delta") else ""), "",
                  f"{m['params'] / 1e6:.0f}M parameters, {m['layers']} layers, {m['dtype']}; prompt "
                  f"{run['prompt_tokens']} tokens, {run['new_tokens']} new tokens a request; torch "
                  f"{run['versions']['torch']}, transformers {run['versions']['transformers']}; commit "
                  f"{commit}.",
                  f"Adapter: MOLoRA on {a['molora']} components ({a['num_experts']} experts, rank {a['rank']}), UCO "
                  f"on {a['uco']}; {a['bytes'] / 1e6:.1f} MB on disk; cold load {run['adapter_cold_load_s'] * 1000:.0f} "
                  f"ms; swap in and out {run['adapter_swap_in_out_ms']:.2f} ms.", "",
                  "| model | concurrent requests | rounds | TTFT ms (median) | TTFT ms (p90) | decode tok/s per request | "
                  "ms per token (median) | ms per token (best round) | aggregate tok/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for variant in ("base", "citi"):
            for conc, r in run["results"][variant].items():
                best = r.get("ms_per_token_min_round")
                lines.append(f"| {variant} | {conc} | {r.get('rounds', run['rounds'])} | {r['ttft_ms']:.1f} | "
                             f"{r['ttft_ms_p90']:.1f} | {r['decode_tok_s_per_request']:.1f} | {r['ms_per_token']:.2f} | "
                             f"{'-' if best is None else f'{best:.2f}'} | {r['aggregate_tok_s']:.1f} |")
        ref = run.get("reference_hf_generate")
        if ref:
            lines += ["", "Reference, plain transformers `generate` on the base model (greedy, dynamic cache, one batch "
                      "of n copies of the prompt): " + "; ".join(
                          f"{c} concurrent: TTFT {r['ttft_ms']:.1f} ms, {r['ms_per_token']:.2f} ms/token, "
                          f"{r['aggregate_tok_s']:.1f} tok/s aggregate" for c, r in ref.items()) + "."]
        overhead = run.get("adapter_overhead")
        how = "paired rounds"
        if not overhead:  # a run from before paired rounds: the ratio of the medians
            res = run["results"]
            overhead = {c: res["citi"][c]["ms_per_token"] / res["base"][c]["ms_per_token"] - 1 for c in res["base"]}
            how = "ratio of medians"
        lines += ["", f"Per-token cost of the adapter against the base ({how}): " + ", ".join(
            f"{v:+.1%} at {c} concurrent" for c, v in overhead.items()) + "."]
        if "1" in overhead:
            verdict = "met" if overhead["1"] <= TARGET_OVERHEAD else "not met"
            lines.append(f"Target at batch 1 (<= {TARGET_OVERHEAD:.0%}) in this run: {verdict}.")
        same = run.get("same_replies_as_dynamic")
        if same:
            lines.append(f"Greedy replies the same token for token as with the dynamic KV cache ({same['prompts']} "
                         f"prompts, {same['new_tokens']} tokens): base {same['base']:.0%}, adapter {same['citi']:.0%}.")
        lines.append("")
    if notes is not None:
        lines += [notes.read_text().rstrip(), ""]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (the base model)")
    what.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model shape (tiny: CPU check)")
    what.add_argument("--tiny", action="store_true", help="CPU check with a tiny random model")
    what.add_argument("--merge", nargs="+", type=Path, help="directories of run JSONs to merge")
    parser.add_argument("--tokenizer-gguf", help="with --shape: take SmolLM2's tokenizer from this GGUF")
    parser.add_argument("--out", type=Path, help="directory for inference_<tag>.json")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10, help="rounds at batch 1 (half as many, at least 3, above)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--attention", choices=("grouped", "sdpa"), default="grouped",
                        help="grouped: the static modes' decode attention (citi_engine.decode_attention; the "
                             "dynamic mode always uses sdpa); sdpa: transformers' sdpa, which copies keys and values "
                             "per query head when a mask is passed")
    parser.add_argument("--decode", choices=DECODE_MODES, default="dynamic",
                        help="how the runtime decodes (CITI_INFERENCE_DECODE)")
    add_adapter_layout_args(parser)
    parser.add_argument("--md", type=Path, default=ROOT / "bench" / "results" / "inference.md")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "inference.json")
    parser.add_argument("--notes", type=Path, help="with --merge: a Markdown file of notes appended to the table")
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, args.md, args.json, args.notes)
        print(f"wrote {args.md} and {args.json}")
        return
    if args.out is None:
        parser.error("--out is required for a run")
    result = run_one(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"inference_{result['tag']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("tag", "card", "adapter_cold_load_s", "adapter_overhead_batch1")}))
    for variant, by_conc in result["results"].items():
        for conc, r in by_conc.items():
            print(variant, conc, r)


if __name__ == "__main__":
    main()
