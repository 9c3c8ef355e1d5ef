"""Training throughput of the engine's methods on one GPU (or several, under torchrun).

One run = one (shape, method, packing) in its own process; it writes ``<tag>.json`` into ``--out``
(tag = ``<shape>_<method>_<packed|padded>[_variant]``). ``--all`` runs a selection of them one
after another, each in a fresh process with its raw log beside its JSON, so a crash or an
out-of-memory in one run costs only that run; a run that runs out of memory without gradient
checkpointing is tried once more with it. ``bench/throughput_merge.py`` turns the JSONs into
``bench/results/throughput.{json,md}``.

    python bench/throughput.py --all --shapes 8b --out $OUT/throughput          # GPU, < 9 minutes
    python bench/throughput.py --shape 1b --method citi_stage2 --packing true --out /tmp/t
    python bench/throughput.py --micro --shape 8b --out $OUT/throughput         # fused MOLoRA vs LoRA r=N*r
    python bench/throughput.py --micro --shape 8b --out $OUT/throughput --profile $OUT/throughput  # + kernels
    torchrun --standalone --nproc_per_node 2 bench/throughput.py --ddp ...       # see bench/ddp_throughput.py
    python bench/throughput.py --smoke --all --out /tmp/smoke                   # CPU, tiny shapes
    python bench/throughput.py --profile-lengths --train-file .data/bfcl/train.jsonl

Models: Llama-3-8B- and Llama-3.2-1B-shaped, random bf16 weights built from a config directly on
the GPU. Methods go through the engine: ``apply_method`` + ``set_trainable`` for each stage, the
trained tensors turned fp32 under bf16 autocast (as ``citi_engine.train`` does), the loss from
``citi_engine.losses.training_loss`` (chunked cross-entropy on labelled tokens only, plus the
routing loss in stages 1 and 2), AdamW (fused) with gradient clipping; ``importance`` times
``citi_engine.importance.compute_importance``. Component sets are fixed (random weights make
importance meaningless): MOLoRA on every fifth component in model order from the first (20%),
UCO on every tenth from the third (10%); they never overlap.

Data: variable-length sequences whose lengths and labelled-token counts follow
``bench/data/bfcl_length_profile.json`` (our BFCL-derived training set, tokenised with the
SmolLM2 tokenizer; built by ``--profile-lengths``), lengths mapped linearly from the set's
[min, max] onto [256, 2048] and the labelled share of each sequence kept (labels on its last
tokens, as an assistant answer at the end). Without the profile: a lognormal fallback (median
600, sigma 0.55, clipped to [256, 2048], 17% labelled), recorded as ``data_source``. The same
seeded sequences for every method; micro-batches of about ``--tokens`` (4096) real tokens, packed
(rows of exactly that many tokens) or padded (a batch closes before it passes that many real
tokens).

Timing: ``--warmup`` steps, then ``--steps`` timed steps between two CUDA events, no host sync
inside the loop (losses stay on the GPU until the end). MFU = tokens/s x (4N + 2N_t) / peak,
N = every matmul weight including the output head, excluding the embedding; N_t the trained
base weights (UCO components in stage 3, everything for full); peak 989e12 (H100 SXM, H200
dense bf16; 756e12 for an H100 PCIe).

Profile: ``--profile DIR`` runs ``--profile-steps`` (3) more steps of a run after its timed ones,
or more fwd+bwd of each ``--micro`` layer after its timing, under the torch profiler, and writes
``<name>.profile.txt`` (tables by self CUDA time on a GPU, CPU time on CPU: the kernels first;
then ops by input shape) and ``<name>.profile.json`` (the top kernels, ``kind: profile``) into DIR.
The timings never include the profiler.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before torch initialises CUDA: fewer fragmentation OOMs with varying batch shapes.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from provenance import commit, versions  # noqa: E402

from citi_engine.files import write_json_atomic  # noqa: E402 (light: no torch)

PROFILE = ROOT / "bench" / "data" / "bfcl_length_profile.json"

SHAPES: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B
    "8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
    # meta-llama/Llama-3.2-1B
    "1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True},
    # CPU smoke test
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
}
METHODS = ("lora", "full", "importance", "citi_stage1", "citi_stage2", "citi_stage3")
STAGE_OF = {"lora": "lora", "full": "full", "citi_stage1": "router_pretraining", "citi_stage2": "molora",
            "citi_stage3": "uco"}
# The order --all runs in: what the targets need first, so a tight time budget drops the least useful.
PRIORITY = [("lora", True), ("citi_stage2", True), ("lora", False), ("citi_stage2", False), ("importance", True),
            ("citi_stage1", True), ("citi_stage3", True), ("full", True), ("importance", False),
            ("citi_stage1", False), ("citi_stage3", False), ("full", False)]
PEAK_FLOPS = {"h100_sxm": 989e12, "h200": 989e12, "h100_pcie": 756e12}
LENGTH_RANGE = (256, 2048)
SMOKE_LENGTH_RANGE = (16, 120)
CITI = {"num_experts": 4, "rank": 8, "alpha": 16.0}
ROUTING_BETA = 5e-4
LR = {"lora": 2e-4, "full": 2e-5, "citi_stage1": 2e-4, "citi_stage2": 2e-4, "citi_stage3": 2e-5}


# ------------------------------------------------------------------------------------------------
# Data


def build_length_profile(train_file: Path, out: Path, max_length: int = 4096) -> dict[str, Any]:
    """Token and labelled-token counts of every example of a training file, with the SmolLM2 tokenizer."""
    import hashlib

    from transformers import AutoTokenizer

    from citi_engine.data.chat_format import encode_example
    from citi_engine.testing import smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    pairs = []
    raw = train_file.read_bytes()
    for line in raw.decode().splitlines():
        if line.strip():
            enc = encode_example(tok, json.loads(line), max_length)
            pairs.append([len(enc["input_ids"]), sum(1 for x in enc["labels"] if x != -100)])
    doc = {
        "source": str(train_file),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "built_by": "bench/build_bfcl_data.py (default arguments), encoded with citi_engine.data.chat_format."
                    "encode_example and the SmolLM2 tokenizer",
        "pairs": pairs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    return doc


def load_lengths(smoke: bool) -> tuple[list[tuple[int, float]], str]:
    """(length, labelled share) pairs on the benchmark's length range, and where they came from."""
    lo, hi = SMOKE_LENGTH_RANGE if smoke else LENGTH_RANGE
    if PROFILE.is_file():
        doc = json.loads(PROFILE.read_text())
        pairs = [(n, lab) for n, lab in doc["pairs"] if n > 0 and lab > 0]
        small, big = min(n for n, _ in pairs), max(n for n, _ in pairs)
        scaled = [(round(lo + (n - small) / max(big - small, 1) * (hi - lo)), lab / n) for n, lab in pairs]
        return scaled, f"bfcl_profile:{PROFILE.relative_to(ROOT)}:{len(pairs)} examples (sha256 {doc['sha256'][:12]})"
    rng = random.Random(1234)
    scaled = []
    for _ in range(2000):
        n = min(hi, max(lo, round(math.exp(rng.gauss(math.log(600 * (hi / 2048)), 0.55)))))
        scaled.append((n, 0.17))
    return scaled, "lognormal_fallback(median 600, sigma 0.55, clip [256, 2048], 17% labelled)"


def make_sequences(n_tokens: int, vocab: int, smoke: bool, seed: int = 0) -> tuple[list[dict], str]:
    """Seeded random sequences, at least ``n_tokens`` tokens in all, lengths from :func:`load_lengths`."""
    lengths, source = load_lengths(smoke)
    rng = random.Random(seed)
    out: list[dict] = []
    total = 0
    while total < n_tokens:
        n, share = lengths[rng.randrange(len(lengths))]
        labelled = max(1, min(n - 1, round(share * n)))
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        labels = [-100] * (n - labelled) + ids[n - labelled:]
        out.append({"input_ids": ids, "labels": labels, "task_type": int(rng.random() < 0.75)})
        total += n
    return out, source


def make_batches(sequences: list[dict], packing: bool, tokens: int) -> list[dict]:
    from citi_engine.packing import pack_examples, pad_batches

    if packing:
        return pack_examples(sequences, max_tokens=tokens, pad_id=0, fixed_length=True)
    return pad_batches(sequences, max_tokens=tokens, pad_id=0)


# ------------------------------------------------------------------------------------------------
# Model and method


def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, use_cache=False, attn_implementation="sdpa",
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def count_params(shape: str) -> dict[str, int]:
    """Parameter counts of a Llama shape (exact; no model needed)."""
    c = SHAPES[shape]
    d, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = c.get("head_dim", d // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * c["intermediate_size"]
    matmul = layers * per_layer + vocab * d  # the output head is a matmul even when tied to the embedding
    params = layers * (per_layer + 2 * d) + d + vocab * d * (1 if c["tie_word_embeddings"] else 2)
    return {"params": params, "matmul": matmul}


def build_model(shape: str, device: str, dtype):
    """Random weights straight on ``device`` (normal(0, 0.02) init runs there: seconds even for 8B)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=dtype)
        except TypeError:  # transformers before the dtype= spelling
            model = AutoModelForCausalLM.from_config(llama_config(shape), torch_dtype=dtype)
    model.config.use_cache = False
    return model


def fixed_components(model) -> tuple[list[str], list[str]]:
    """MOLoRA: every fifth component from the first; UCO: every tenth from the third (never the same)."""
    from citi_engine.components import list_components

    names = list_components(model)
    molora, uco = names[0::5], names[2::10]
    assert not set(molora) & set(uco)
    return molora, uco


def matmul_weights(model) -> int:
    from torch import nn

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def prepare_method(model, method: str) -> tuple[Any, list, int, dict[str, Any]]:
    """Apply the method through the engine; return (model, trained params, N_t, details)."""
    import torch

    from citi_engine.adapter import apply_method, set_trainable

    details: dict[str, Any] = {}
    if method == "importance":
        model.requires_grad_(False)
        return model, [], 0, details
    if method == "lora":
        model = apply_method(model, "lora", lora_rank=16, lora_alpha=16)
    elif method == "full":
        model = apply_method(model, "full")
    else:
        molora, uco = fixed_components(model)
        details.update(molora=len(molora), uco=len(uco))
        model = apply_method(model, "citi", molora=molora, uco=uco, **CITI)
    names = set(set_trainable(model, STAGE_OF[method]))
    params = [p for n, p in model.named_parameters() if n in names]
    # As citi_engine.train does: every trained tensor is an fp32 master copy, the forward runs in bf16 autocast.
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    n_t = 0
    if method == "full":
        n_t = matmul_weights(model)
    elif method == "citi_stage3":
        from peft.utils import ModulesToSaveWrapper

        for m in model.modules():
            if isinstance(m, ModulesToSaveWrapper):
                n_t += sum(p.numel() for p in m.modules_to_save.parameters() if p.requires_grad and p.dim() == 2)
    details["trained_params"] = sum(p.numel() for p in params)
    return model, params, n_t, details


def compile_model(model, mode: str) -> str:
    """torch.compile the RMSNorm modules (``norms``: one small graph shared by every norm) or every decoder layer.

    Compilation is lazy (first step, inside the warm-up). A failure falls back to eager for that
    module (``suppress_errors``) instead of ending the run; ``compile_graphs`` in the result says
    how many graphs were actually built.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if mode == "norms":
        targets = [m for m in base.modules() if type(m).__name__.endswith("RMSNorm")]
    else:
        targets = list(base.get_decoder().layers)
    for module in targets:
        module.compile()
    return f"{mode}: {len(targets)} modules"


def peak_flops(card: str) -> tuple[float | None, str]:
    name = card.lower()
    if "h200" in name or "gh200" in name:
        return PEAK_FLOPS["h200"], "H200 dense bf16 (989 TFLOP/s)"
    if "h100" in name and "pcie" in name:
        return PEAK_FLOPS["h100_pcie"], "H100 PCIe dense bf16 (756 TFLOP/s)"
    if "h100" in name:
        return PEAK_FLOPS["h100_sxm"], "H100 SXM dense bf16 (989 TFLOP/s)"
    if name == "cpu":
        return None, "cpu: no MFU"
    return PEAK_FLOPS["h100_sxm"], f"unknown card {card!r}: H100 SXM peak assumed"


def run_tag(shape: str, method: str, packing: bool, variant: str = "") -> str:
    return f"{shape}_{method}_{'packed' if packing else 'padded'}" + (f"_{variant}" if variant else "")


# ------------------------------------------------------------------------------------------------
# One run


class Clock:
    """Elapsed time of a stretch of GPU work: CUDA events (no sync until read), or the host clock on CPU."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda = cuda
        self._torch = torch
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks (synchronises once, here)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]
        return [b - a for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]


def kernel_report(prof, cuda: bool, title: str, top: int = 30) -> tuple[str, dict[str, Any]]:
    """The engine's (a job's ``CITI_PROFILE_DIR`` profile writes the same tables): imported here, where torch is."""
    from citi_engine.training.profiling import kernel_report as report

    return report(prof, cuda, title, top)


def profiled(work: Callable[[], Any], cuda: bool):
    """Run ``work`` once under the torch profiler (CPU, and CUDA kernels on a GPU, input shapes recorded)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        work()
        if cuda:
            torch.cuda.synchronize()
    return prof


def write_profile(out: Path, name: str, texts: list[str], doc: dict[str, Any]) -> list[str]:
    """``<name>.profile.txt`` (the tables) and ``<name>.profile.json`` (top kernels) in ``out``; their names."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.profile.txt").write_text("\n\n".join(texts) + "\n")
    # kind "profile" and no "method" key: bench/throughput_merge.py reads every JSON of a folder and skips these.
    _write_json(out / f"{name}.profile.json", {"kind": "profile", **doc})
    return [f"{name}.profile.txt", f"{name}.profile.json"]


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from citi_engine.distributed import (
        LossModule,
        all_reduce_max,
        all_reduce_sum,
        init_distributed,
        shard,
        wrap_ddp,
    )
    from citi_engine.losses import training_loss
    from citi_engine.packing import enable_varlen_attention, to_device

    t_start = time.perf_counter()
    info = init_distributed() if args.ddp else None
    world = info.world_size if info else 1
    device = info.device if info else ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cuda = device.startswith("cuda")
    card = torch.cuda.get_device_name(device) if cuda else "cpu"
    shape, method, packing = args.shape, args.method, args.packing
    result: dict[str, Any] = {
        "shape": shape, "method": method, "packing": packing, "card": card, "status": "ok",
        "tag": run_tag(shape, method, packing, args.variant), "variant": args.variant, "world_size": world,
        "ddp": bool(args.ddp),
        "argv": sys.argv[1:], "commit": commit(), "versions": versions(),
    }
    if method == "importance" and world > 1:
        raise SystemExit("importance is timed on one GPU only; drop --ddp for it")

    counts = count_params(shape)
    if cuda and method == "full":
        # fp32 weights + fp32 gradients + two fp32 AdamW moments: 16 bytes a parameter before any activation.
        need = counts["params"] * 16
        have = torch.cuda.get_device_properties(device).total_memory
        if need > have:
            result.update(status="skipped", reason=(
                f"full fine-tuning with fp32 master weights and AdamW needs {need / 2**30:.0f} GiB for weights, "
                f"gradients and optimizer states alone; the card has {have / 2**30:.0f} GiB (FSDP over several GPUs "
                "would be needed)"))
            return result

    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(shape, device, dtype)
    n_matmul = matmul_weights(model)
    model, params, n_t, details = prepare_method(model, method)
    result.update(details)
    if args.grad_ckpt == "on":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(method != "importance")

    attention = "sdpa"
    if packing and args.attn in ("auto", "varlen"):
        attention = enable_varlen_attention(model, allow_reference=args.smoke)
        if attention == "sdpa":
            result["varlen_skipped"] = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model,
                                               "citi_varlen_skipped", None)
            if args.attn == "varlen":
                raise SystemExit(f"--attn varlen asked for, but unusable here: {result['varlen_skipped']}")
    result["attention"] = attention + ("" if packing or attention != "sdpa" else " (padding mask)")

    if args.compile != "off":
        result["compile_graphs"] = compile_model(model, args.compile)

    # Data: the same seeded sequences for every method; enough batches for every rank's warm-up and timed steps.
    steps_needed = (args.warmup + args.steps) * world
    hi = (SMOKE_LENGTH_RANGE if args.smoke else LENGTH_RANGE)[1]
    sequences, source = make_sequences(int(args.tokens * steps_needed * 1.15) + 4 * hi,
                                       SHAPES[shape]["vocab_size"], args.smoke)
    batches = make_batches(sequences, packing, args.tokens)
    while len(batches) < steps_needed:
        batches = batches + batches
    batches = batches[:steps_needed]
    if info is not None and info.enabled:
        batches = shard(batches, info)
    batches = [to_device(b, device) for b in batches]
    warm, timed = batches[: args.warmup], batches[args.warmup:]
    slots = sum(b["input_ids"].numel() for b in timed)
    real = sum(b["num_tokens"] for b in timed)
    result.update(data_source=source, n_sequences=len(sequences), tokens_target=args.tokens,
                  real_tokens_per_step=real / len(timed), token_slots_per_step=slots / len(timed),
                  padding_fraction=1 - real / slots, label_tokens_per_step=sum(b["num_label_tokens"] for b in timed)
                  / len(timed), grad_ckpt=args.grad_ckpt == "on", compile=args.compile, loss=args.loss)
    setup_s = time.perf_counter() - t_start

    if method == "importance":
        from citi_engine.importance import compute_importance

        clock = Clock(cuda)
        compute_importance(model, {"tool": warm}, device=device)
        clock.mark()
        scores = compute_importance(model, {"tool": timed}, device=device)
        clock.mark()
        elapsed = clock.intervals()[0]
        step_times = [elapsed / len(timed)] * len(timed)
        finite = all(math.isfinite(v) for v in scores.T["tool"].values())
        last_loss = None

        def profile_work():
            compute_importance(model, {"tool": timed[: args.profile_steps]}, device=device)
    else:
        routing = method in ("citi_stage1", "citi_stage2")
        if args.loss == "soft" and method == "full":
            raise SystemExit("--loss soft needs adapters to switch off for the teacher (lora or citi_stage*)")

        def loss_fn(m, batch):
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
                if args.loss == "soft":
                    # The trainer's loss with soft targets: cross-entropy on tool answers, KL to the same model
                    # with its adapters off on general answers (a teacher pass over the general examples only).
                    from citi_engine.adapter import routing_loss
                    from citi_engine.losses import Teacher, answer_losses

                    ce_sum, kl_sum, _, _ = answer_losses(m, batch, teacher=Teacher(m))
                    loss = (ce_sum + kl_sum) / max(int(batch["num_label_tokens"]), 1)
                    if routing:
                        mask = batch.get("sequence_mask", batch.get("attention_mask"))
                        loss = loss + ROUTING_BETA * routing_loss(m, batch["task_type"], mask)
                    return loss
                if args.loss == "hf":
                    from citi_engine.packing import model_inputs

                    out = m(**model_inputs(batch), labels=batch["labels"])
                    loss = out.loss
                    if routing:
                        from citi_engine.adapter import routing_loss

                        mask = batch.get("sequence_mask", batch.get("attention_mask"))
                        loss = loss + ROUTING_BETA * routing_loss(m, batch["task_type"], mask)
                    return loss
                total, _, _ = training_loss(m, batch, routing_beta=ROUTING_BETA if routing else 0.0)
                return total

        step_module = wrap_ddp(LossModule(model, loss_fn), info) if info is not None else LossModule(model, loss_fn)
        optimizer = torch.optim.AdamW(params, lr=LR[method], weight_decay=0.0, fused=cuda)
        losses = torch.zeros(len(timed), device=device)

        def step(batch):
            loss = step_module(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=cuda or None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        for batch in warm:
            step(batch)
        clock = Clock(cuda)
        clock.mark()
        for i, batch in enumerate(timed):
            losses[i] = step(batch)
            clock.mark()
        step_times = clock.intervals()
        elapsed = sum(step_times)
        last_loss = losses.tolist()
        finite = all(math.isfinite(v) for v in last_loss)

        def profile_work():
            for batch in timed[: args.profile_steps]:
                step(batch)

    if args.profile:
        # After the timed steps (the profiler's overhead stays out of the timings), every rank alike (DDP).
        from citi_engine.distributed import is_main

        prof = profiled(profile_work, cuda)
        name = result["tag"] + (f"_ddp{world}" if args.ddp else "")
        n = min(args.profile_steps, len(timed))
        if is_main():
            text, doc = kernel_report(prof, cuda, f"{name}: {n} steps after {len(warm) + len(timed)}, {card}")
            result["profile_files"] = write_profile(Path(args.profile), name, [text], {
                **doc, "tag": name, "card": card, "steps": n, "commit": result["commit"]})

    elapsed_t = torch.tensor([elapsed], dtype=torch.float64, device=device)
    real_t = torch.tensor([float(real)], dtype=torch.float64, device=device)
    if info is not None and info.enabled:
        elapsed_t, real_t = all_reduce_max(elapsed_t, info), all_reduce_sum(real_t, info)
    elapsed, real_all = float(elapsed_t.item()), float(real_t.item())
    tokens_per_s = real_all / elapsed
    flops_per_token = 4 * n_matmul + 2 * n_t
    peak, peak_note = peak_flops(card)
    sorted_steps = sorted(step_times)
    result.update(
        tokens_per_s=tokens_per_s,
        tokens_per_s_per_gpu=tokens_per_s / world,
        step_s=elapsed / len(timed),
        step_s_median=sorted_steps[len(sorted_steps) // 2],
        step_s_min=sorted_steps[0],
        step_s_max=sorted_steps[-1],
        steps=len(timed),
        warmup=len(warm),
        peak_gib=(torch.cuda.max_memory_allocated(device) / 2**30) if cuda else None,
        reserved_gib=(torch.cuda.max_memory_reserved(device) / 2**30) if cuda else None,
        N=n_matmul,
        N_t=n_t,
        params=counts["params"],
        flops_per_token=flops_per_token,
        peak_flops=peak,
        peak_note=peak_note,
        mfu=(tokens_per_s / world * flops_per_token / peak) if peak else None,
        losses=last_loss,
        finite=finite,
        setup_s=setup_s,
        wall_s=time.perf_counter() - t_start,
    )
    if args.compile != "off":
        from torch._dynamo.utils import counters

        result["compile_graphs"] += f", {counters['stats']['unique_graphs']} graphs built"
    if not finite:
        result["status"] = "nonfinite_loss"
    return result


# ------------------------------------------------------------------------------------------------
# Micro-benchmark: the fused MOLoRA layer against a plain LoRA of rank experts x r


def run_micro(args: argparse.Namespace) -> dict[str, Any]:
    """Forward + backward of single layers with the shapes of the MOLoRA components, four ways (six).

    base (frozen linear alone), peft LoRA with r = experts x rank, MOLoRA (the engine's layer:
    router and A in one matmul) and ``molora_2mm``, the same layer with router and A as two
    matmuls (its path with dropout, here a dropout that drops nothing: the layer before the
    one-matmul change, side by side with it); with ``--micro-compile`` also LoRA and MOLoRA each
    under ``torch.compile`` (the elementwise work between the matmuls fused into few kernels);
    everything trainable of the adapters, the input requiring grad (as inside a network), bf16
    autocast, ``--tokens`` tokens. Each layer's time is the median of ``--micro-rounds`` rounds of
    ``--steps`` (at least 30) iterations, the ways taking turns within a round and each round
    starting one way later: a single stretch per way let one module type come out up to 1.8x apart
    from another of the same shape (fifth session), which is as large as the effects measured.
    Times are summed over the MOLoRA set's module types weighted by how often each type occurs in
    it. With ``--profile DIR`` each layer is then profiled over ``--profile-steps`` more
    iterations: ``<shape>_micro_molora.profile.{txt,json}``.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from citi_engine.components import component_info
    from citi_engine.molora import MoloraConfig

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    shape = SHAPES[args.shape]
    hd = shape.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    d, inter = shape["hidden_size"], shape["intermediate_size"]
    dims = {"q_proj": (d, shape["num_attention_heads"] * hd), "k_proj": (d, shape["num_key_value_heads"] * hd),
            "v_proj": (d, shape["num_key_value_heads"] * hd), "o_proj": (shape["num_attention_heads"] * hd, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    # The MOLoRA set of the full model: every fifth component in model order.
    order = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    names = [f"model.layers.{i}.x.{m}" for i in range(shape["num_hidden_layers"]) for m in order]
    counts: dict[str, int] = {}
    for name in names[0::5]:
        counts[component_info(name)[1]] = counts.get(component_info(name)[1], 0) + 1

    class Holder(nn.Module):
        def __init__(self, din, dout):
            super().__init__()
            self.proj = nn.Linear(din, dout, bias=False, device=device, dtype=dtype)

    def layer_for(kind: str, din: int, dout: int):
        torch.manual_seed(0)
        holder = Holder(din, dout)
        holder.requires_grad_(False)
        if kind == "base":
            return holder.proj, []
        if kind == "lora":
            cfg = LoraConfig(r=CITI["num_experts"] * CITI["rank"], lora_alpha=CITI["alpha"], target_modules=["proj"],
                             lora_dropout=0.0, init_lora_weights=False)
        else:
            cfg = MoloraConfig(target_modules=["proj"], num_experts=CITI["num_experts"], r=CITI["rank"],
                               alpha=CITI["alpha"], init_weights=False)
        wrapped = get_peft_model(holder, cfg)
        layer = wrapped.base_model.model.proj
        if kind == "molora_2mm":
            # Not nn.Identity, so the layer keeps router and A apart; dropout with p=0 returns its input unchanged.
            layer.molora_dropout["default"] = nn.Dropout(0.0)
        params = [p for p in layer.parameters() if p.requires_grad]
        return layer, params

    def fwd_bwd(layer, x, grad):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            y = layer(x)
        y.backward(grad)

    def time_layer(layer, x, grad, iters):
        clock = Clock(cuda)
        for i in range(args.warmup + iters):
            if i == args.warmup:
                clock.mark()
            fwd_bwd(layer, x, grad)
        clock.mark()
        return clock.intervals()[0] / iters

    iters = args.steps if args.smoke else max(args.steps, 30)
    kinds = ("base", "lora", "molora_2mm", "molora") + (("lora_compiled", "molora_compiled") if args.micro_compile
                                                        else ())
    rows = []
    totals = dict.fromkeys(kinds, 0.0)
    # With --profile on a GPU: the kernels' own time per fwd+bwd (the profiler's busy time), which leaves out
    # what the host spends launching them; a layer timed alone in a loop pays that, a layer inside a model
    # mostly hides it behind the kernels queued before.
    totals_busy: dict[str, float] = {}
    texts, profiles = [], []
    for module, (din, dout) in dims.items():
        if module not in counts:
            continue
        x = torch.randn(args.tokens, din, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(args.tokens, dout, device=device, dtype=dtype)
        if args.micro_compile:
            # A fresh cache per module: dynamo keys its graphs by code object, and seven module shapes times the
            # router's two states would pass its recompile limit, past which it runs the layer eagerly unannounced.
            torch._dynamo.reset()
        layers = {}
        for kind in kinds:
            layer, _ = layer_for(kind.removesuffix("_compiled"), din, dout)
            layers[kind] = torch.compile(layer) if kind.endswith("_compiled") else layer
            # Built (and compiled) before any round is timed: MOLoRA's second call compiles again (the router's
            # probabilities kept from the first change what its graph guards on), the third runs the graph.
            time_layer(layers[kind], x, grad, 2)
        samples: dict[str, list[float]] = {kind: [] for kind in kinds}
        for round_ in range(args.micro_rounds):
            turn = round_ % len(kinds)
            for kind in kinds[turn:] + kinds[:turn]:
                samples[kind].append(time_layer(layers[kind], x, grad, iters))
        times = {kind: statistics.median(v) for kind, v in samples.items()}
        busy = {}
        if args.profile:
            for kind, layer in layers.items():
                def work(layer=layer, x=x, grad=grad):
                    for _ in range(args.profile_steps):
                        fwd_bwd(layer, x, grad)

                text, doc = kernel_report(profiled(work, cuda), cuda,
                                          f"{module} {din}->{dout} {kind}, {args.profile_steps} fwd+bwd, {card}")
                texts.append(text)
                profiles.append({"module": module, "kind": kind, **doc})
                if cuda:  # on CPU the profile's busy time is the ops' host time, already in the timings
                    busy[kind] = doc["busy_us"] / 1000 / args.profile_steps  # ms of kernels per fwd+bwd
        del layers
        rows.append({"module": module, "in": din, "out": dout, "count": counts[module],
                     **{f"{k}_ms": v * 1000 for k, v in times.items()},
                     **{f"{k}_ms_range": [min(v) * 1000, max(v) * 1000] for k, v in samples.items()},
                     **{f"{k}_busy_ms": v for k, v in busy.items()}})
        for k in totals:
            totals[k] += times[k] * counts[module]
            if k in busy:
                totals_busy[k] = totals_busy.get(k, 0.0) + busy[k] * counts[module]
    result = {
        "kind": "micro_molora", "shape": args.shape, "card": card, "tokens": args.tokens,
        "num_experts": CITI["num_experts"], "rank": CITI["rank"], "lora_rank": CITI["num_experts"] * CITI["rank"],
        "rounds": args.micro_rounds, "iters_per_round": iters,
        "rows": rows, "total_ms": {k: v * 1000 for k, v in totals.items()},
        "ratio_molora_vs_lora": totals["molora"] / totals["lora"],
        "ratio_molora_2mm_vs_lora": totals["molora_2mm"] / totals["lora"],
        "ratio_molora_vs_molora_2mm": totals["molora"] / totals["molora_2mm"],
        "overhead_ratio": (totals["molora"] - totals["base"]) / max(totals["lora"] - totals["base"], 1e-12),
        "commit": commit(), "versions": versions(), "status": "ok",
    }
    if totals_busy:
        result["busy_ms"] = totals_busy
        result["ratio_molora_vs_lora_busy"] = totals_busy["molora"] / totals_busy["lora"]
    if args.micro_compile:
        result["ratio_molora_compiled_vs_lora_compiled"] = totals["molora_compiled"] / totals["lora_compiled"]
        result["ratio_molora_compiled_vs_lora"] = totals["molora_compiled"] / totals["lora"]
    if args.profile:
        result["profile_files"] = write_profile(Path(args.profile), f"{args.shape}_micro_molora", texts, {
            "of": "micro_molora", "shape": args.shape, "card": card, "tokens": args.tokens,
            "steps": args.profile_steps, "commit": result["commit"], "layers": profiles})
    return result


# ------------------------------------------------------------------------------------------------
# Driver: several runs, each in a fresh process


def _child_args(args: argparse.Namespace, shape: str, method: str, packing: bool, grad_ckpt: str) -> list[str]:
    out = [sys.executable, str(Path(__file__).resolve()), "--shape", shape, "--method", method,
           "--packing", "true" if packing else "false", "--out", str(args.out), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--tokens", str(args.tokens), "--grad-ckpt", grad_ckpt,
           "--attn", args.attn, "--loss", args.loss]
    if args.compile != "off":
        out += ["--compile", args.compile]
    if args.smoke:
        out.append("--smoke")
    if args.variant:
        out += ["--variant", args.variant]
    return out + _profile_args(args)


def _profile_args(args: argparse.Namespace) -> list[str]:
    return ["--profile", str(args.profile), "--profile-steps", str(args.profile_steps)] if args.profile else []


def _classify_failure(log: str) -> str:
    if "OutOfMemoryError" in log or "CUDA out of memory" in log:
        return "oom"
    if "Timeout" in log:
        return "timeout"
    return "error"


def run_all(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = args.shapes.split(",")
    methods = set(args.methods.split(","))
    packings = {p.strip().lower() == "true" for p in args.packings.split(",")}
    plan = [(s, m, p) for s in shapes for m, p in PRIORITY if m in methods and p in packings]
    t0 = time.monotonic()
    longest = 0.0
    summary = []
    for shape, method, packing in plan:
        tag = run_tag(shape, method, packing, args.variant)
        # Gradient checkpointing only acts in training mode: scoring importance gets no retry.
        attempts = ["on"] if args.grad_ckpt == "on" else (["off"] if method == "importance" else ["off", "on"])
        for n, gc in enumerate(attempts):
            left = args.budget_s - (time.monotonic() - t0)
            # Leave room for a run as long as the longest so far (a first run gets the benefit of the doubt).
            if left < max(30.0, 0.8 * longest):
                _write_json(out / f"{tag}.json", {"shape": shape, "method": method, "packing": packing,
                                                  "status": "skipped", "reason": f"time budget: {left:.0f} s left",
                                                  "tag": tag, "variant": args.variant})
                summary.append((tag, "skipped (time)"))
                break
            log_path = out / (f"{tag}.log" if n == 0 else f"{tag}.gc.log")
            started = time.monotonic()
            with open(log_path, "w") as log:
                try:
                    proc = subprocess.run(_child_args(args, shape, method, packing, gc), stdout=log,
                                          stderr=subprocess.STDOUT, timeout=min(left, args.run_timeout_s))
                    code = proc.returncode
                except subprocess.TimeoutExpired:
                    log.write("\nTimeout: the run took longer than its share of the time budget\n")
                    code = -1
            took = time.monotonic() - started
            longest = max(longest, took)
            text = log_path.read_text(errors="replace")
            json_path = out / f"{tag}.json"
            if code == 0 and json_path.is_file():
                doc = json.loads(json_path.read_text())
                if n > 0:
                    doc["first_attempt"] = "oom without gradient checkpointing"
                    _write_json(json_path, doc)
                summary.append((tag, f"{doc.get('status')} {doc.get('tokens_per_s') or 0:,.0f} tok/s "
                                     f"({took:.0f} s, gc={gc})"))
                break
            status = _classify_failure(text)
            tail = "\n".join(text.strip().splitlines()[-5:])
            _write_json(json_path, {"shape": shape, "method": method, "packing": packing, "status": status,
                                    "reason": tail[-800:], "grad_ckpt": gc == "on", "tag": tag,
                                    "variant": args.variant, "log": log_path.name})
            summary.append((tag, f"{status} ({took:.0f} s, gc={gc})"))
            if status != "oom":
                break
    if args.micro:
        for shape in shapes:
            left = args.budget_s - (time.monotonic() - t0)
            tag = f"{shape}_micro_molora"
            if left < 40:
                summary.append((tag, "skipped (time)"))
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--micro", "--shape", shape, "--out", str(out),
                   "--tokens", str(args.tokens), "--micro-rounds", str(args.micro_rounds)]
            cmd += (["--smoke", "--steps", str(args.steps)] if args.smoke else []) + (
                ["--micro-compile"] if args.micro_compile else [])
            cmd += _profile_args(args)
            with open(out / f"{tag}.log", "w") as log:
                try:
                    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          timeout=min(left, args.run_timeout_s)).returncode
                except subprocess.TimeoutExpired:
                    code = -1
            summary.append((tag, "ok" if code == 0 else f"failed ({code})"))
    for tag, line in summary:
        print(f"{tag:40s} {line}")
    print(f"total {time.monotonic() - t0:.0f} s")
    return 0


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    write_json_atomic(path, doc)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError("use true or false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--method", default="citi_stage2", choices=METHODS)
    p.add_argument("--packing", type=_bool, default=True, help="true: packed rows; false: padded batches")
    p.add_argument("--out", default="bench/results/throughput_raw", help="folder for the run's JSON (and logs)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    p.add_argument("--tokens", type=int, default=None, help="real tokens per micro-batch (default 4096; smoke 256)")
    p.add_argument("--grad-ckpt", default="auto", choices=("auto", "on", "off"),
                   help="gradient checkpointing; auto = off, and --all retries an OOM run with it on")
    p.add_argument("--compile", default="off", choices=("off", "norms", "layers"),
                   help="torch.compile the RMSNorms (cheap: one shared graph) or every decoder layer (slow to build)")
    p.add_argument("--attn", default="auto", choices=("auto", "sdpa", "varlen"),
                   help="packed rows: auto = the checked variable-length flash kernel when usable, else sdpa")
    p.add_argument("--loss", default="chunked", choices=("chunked", "hf", "soft"),
                   help="chunked: the engine's loss; hf: the model's own loss over full logits; soft: the trainer's "
                        "loss with soft targets on the general examples (a teacher pass with adapters off)")
    p.add_argument("--variant", default="", help="suffix of the run tag, for runs with non-default options")
    p.add_argument("--ddp", action="store_true", help="running under torchrun: data-parallel over its processes")
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, a few steps (checks the code paths)")
    p.add_argument("--all", action="store_true", help="run a selection, each in a fresh process")
    p.add_argument("--shapes", default="8b", help="--all: comma-separated shapes")
    p.add_argument("--methods", default=",".join(METHODS), help="--all: comma-separated methods")
    p.add_argument("--packings", default="true,false", help="--all: true, false or both")
    p.add_argument("--budget-s", type=float, default=510.0, help="--all: stop starting runs after this many seconds")
    p.add_argument("--run-timeout-s", type=float, default=240.0, help="--all: kill a run after this many seconds")
    p.add_argument("--micro", action="store_true", help="the fused-MOLoRA micro-benchmark (with --all: after the runs)")
    p.add_argument("--micro-rounds", type=int, default=None,
                   help="--micro: rounds per layer, the ways taking turns; the median is reported (default 7; smoke 2)")
    p.add_argument("--micro-compile", action="store_true",
                   help="--micro: also LoRA and MOLoRA under torch.compile (about a minute more on a GPU)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile (torch profiler) each run after its timed steps, or each --micro layer after "
                        "its timing, and write the kernel table (<name>.profile.txt) and the top kernels "
                        "(<name>.profile.json) into DIR")
    p.add_argument("--profile-steps", type=int, default=3, help="--profile: steps (or layer fwd+bwd) profiled")
    p.add_argument("--profile-lengths", action="store_true", help="write bench/data/bfcl_length_profile.json")
    p.add_argument("--train-file", default=".data/bfcl/train.jsonl", help="--profile-lengths: the training file")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape = "tiny"
        args.shapes = "tiny"
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.tokens = args.tokens if args.tokens is not None else (256 if args.smoke else 4096)
    args.micro_rounds = args.micro_rounds if args.micro_rounds is not None else (2 if args.smoke else 7)
    if args.micro_rounds < 1:
        p.error(f"--micro-rounds must be at least 1, got {args.micro_rounds}")
    if not args.variant:  # runs with non-default options get their own tags, never overwriting the defaults
        parts = [f"compile-{args.compile}"] if args.compile != "off" else []
        parts += ["hfloss"] if args.loss == "hf" else []
        parts += [f"attn-{args.attn}"] if args.attn != "auto" else []
        parts += [f"tok{args.tokens}"] if args.tokens != (256 if args.smoke else 4096) else []
        args.variant = "-".join(parts)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile_lengths:
        train = Path(args.train_file)
        if not train.is_file():
            raise SystemExit(f"{train} does not exist: build it with python bench/build_bfcl_data.py")
        doc = build_length_profile(train, PROFILE)
        lengths = sorted(n for n, _ in doc["pairs"])
        print(f"{PROFILE}: {len(lengths)} examples, tokens min {lengths[0]} median {lengths[len(lengths) // 2]} "
              f"max {lengths[-1]}")
        return 0
    if args.all:
        return run_all(args)
    out = Path(args.out)
    if args.micro:
        result = run_micro(args)
        _write_json(out / f"{args.shape}_micro_molora.json", result)
        keys = ("total_ms", "ratio_molora_vs_lora", "ratio_molora_2mm_vs_lora", "ratio_molora_vs_molora_2mm",
                "overhead_ratio", "ratio_molora_compiled_vs_lora_compiled", "ratio_molora_vs_lora_busy",
                "profile_files")
        print(json.dumps({k: result.get(k) for k in keys}))
        return 0
    result = run_one(args)
    from citi_engine.distributed import is_main

    if is_main():
        name = result["tag"] + (f"_ddp{result['world_size']}" if args.ddp else "")
        _write_json(out / f"{name}.json", result)
        keys = ("status", "tokens_per_s", "step_s", "peak_gib", "mfu", "attention", "reason", "profile_files")
        print(json.dumps({k: result.get(k) for k in keys}))
    if args.ddp:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
