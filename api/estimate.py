"""``POST /jobs/estimate``: what a job would cost before it runs. Torch-free and rough by design.

- Tokens: counted with the model's ``tokenizer.json`` (the fast ``tokenizers`` library, no torch) where one
  is on disk, else estimated as characters / 4; messages are counted with a few tokens of chat-template
  overhead each, and the tools' JSON once per example (the tool block in the system turn).
- Steps: the engine's own plan (:func:`citi_engine.budget.plan_stages`) from epochs, batch size and budget.
- Seconds: trained tokens over a throughput from :data:`THROUGHPUT` (measured) or, for other models, a
  compute rule (about 6 x parameters FLOPs per trained token at a sustained rate per device), plus model
  loading, importance scoring, replay generation and evaluation.
- Several GPUs (``CITI_GPUS_PER_JOB``): a job trains data-parallel, every process on its share of each step's
  examples, so the steps stay the same and the training time divides by the GPUs at the scaling measured on
  2 H200s (bench/results/throughput.md); importance scoring, replay and evaluation run on one process.
  Memory is per GPU: every process holds the whole model.
- Memory: frozen weights in the model dtype, trainable weights with fp32 master copy, gradient and
  AdamW state (16 bytes each), and activations for one batch; compared with ``CITI_GPU_MEMORY_GB``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from citi_engine import DEFAULT_MODEL

# Model shapes known without reading a config (the built-in model is a GGUF file).
KNOWN_SHAPES: dict[str, dict[str, int]] = {
    DEFAULT_MODEL: {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
                    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                    "tie_word_embeddings": 1},
}

# Measured training throughput of a whole job in trained tokens per second. GPU: the CITI job of the service's run
# on an H100 (bench/results/gpu_service.md): 2,358,713 tokens in 164 s over its three stages, about 14k tokens/s
# in each. A bare full fine-tuning step of 16 x 512 tokens runs at about 100k tokens/s (docs/data-and-models.md),
# which made the estimate of that job's training 10x too short. CPU: 160 (2 cores).
THROUGHPUT: dict[str, dict[str, float]] = {
    DEFAULT_MODEL: {"gpu": 14_000.0, "cpu": 160.0},
}
# Bare forward and backward passes, as importance scoring runs them: the 100k above (the same job scored its
# components in 3 s).
SCORING_THROUGHPUT: dict[str, dict[str, float]] = {
    DEFAULT_MODEL: {"gpu": 100_000.0, "cpu": 160.0},
}
# Sustained FLOP/s for models not in the table: H100/H200 bf16 at the rate the LoRA 8B run reached; a 2-core CPU.
SUSTAINED_FLOPS = {"gpu": 3.5e14, "cpu": 1.3e11}
MAX_SMALL_MODEL_TOKENS_S = {"gpu": 100_000.0, "cpu": 50_000.0}
DECODE_TOKENS_S = {"gpu": 2_000.0, "cpu": 40.0}  # batched greedy generation, tokens/s over the batch
# Data-parallel speed-up per GPU: 1.998x on 2 H200s for CITI stage 2 of the 8B shape (bench/results/throughput.md).
DDP_EFFICIENCY = 0.999
MESSAGE_OVERHEAD_TOKENS = 4
MAX_COUNTED_EXAMPLES = 2000


def model_shape(resolved) -> dict[str, int] | None:
    """Hidden size, layers, vocabulary... of a resolved spec, when known without loading it."""
    if resolved.spec in KNOWN_SHAPES:
        return KNOWN_SHAPES[resolved.spec]
    if resolved.kind == "hf_dir":
        try:
            config = json.loads((Path(resolved.path) / "config.json").read_text())
        except (OSError, ValueError):
            return None
        config = config.get("text_config", config)
        needed = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
        if all(isinstance(config.get(k), int) for k in needed):
            return {**{k: config[k] for k in needed},
                    "num_key_value_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
                    "tie_word_embeddings": int(bool(config.get("tie_word_embeddings", False)))}
    return None


def parameter_counts(shape: dict[str, int]) -> tuple[int, int]:
    """``(all parameters, parameters in the decoder's linear projections)`` of a Llama-like model."""
    h, layers, inter = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    linear_per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter
    linear = layers * linear_per_layer
    embeddings = shape["vocab_size"] * h * (1 if shape.get("tie_word_embeddings") else 2)
    norms = layers * 2 * h + h
    return linear + embeddings + norms, linear


def _cached_default_tokenizer() -> Path | None:
    import os

    root = os.environ.get("CITI_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "citi"))
    path = Path(root) / "smollm2-tokenizer" / "tokenizer.json"
    return path if path.is_file() else None


def count_tokens(examples: list[dict[str, Any]], resolved) -> tuple[list[int], str]:
    """Tokens of each example (approximate rendering) and how they were counted."""
    path = None
    if resolved.kind == "hf_dir" and (Path(resolved.path) / "tokenizer.json").is_file():
        path = Path(resolved.path) / "tokenizer.json"
    elif resolved.spec == DEFAULT_MODEL:
        path = _cached_default_tokenizer()
    texts = []
    for ex in examples:
        parts = [json.dumps(ex.get("tools"))] if ex.get("tools") else []
        n_messages = 0
        for msg in ex.get("messages") or []:
            n_messages += 1
            if isinstance(msg.get("content"), str):
                parts.append(msg["content"])
            for call in msg.get("tool_calls") or []:
                parts.append(json.dumps(call.get("function", call)))
        texts.append(("\n".join(parts), n_messages))
    if path is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        encoded = tok.encode_batch([t for t, _ in texts], add_special_tokens=False)
        return [len(e.ids) + n * MESSAGE_OVERHEAD_TOKENS for e, (_, n) in zip(encoded, texts, strict=True)], \
            "tokenizer"
    return [math.ceil(len(t) / 4) + n * MESSAGE_OVERHEAD_TOKENS for t, n in texts], "approximate"


def read_examples(storage, key: str, n_examples: int) -> list[dict[str, Any]]:
    """An even sample of the examples of a stored file, read one line at a time: the file is never held whole,
    so the estimate of a large upload takes no more memory than its sample. ``n_examples`` is how many
    examples the estimate counts in all (the file records say; the training and general files together), so
    every file is sampled at the same rate and the whole sample holds about ``MAX_COUNTED_EXAMPLES``. Pass
    the sample to :func:`estimate_job` with ``n_examples``."""
    every = max(1, n_examples // MAX_COUNTED_EXAMPLES)
    out: list[dict[str, Any]] = []
    seen = 0
    with storage.open(key) as src:
        for line in src:
            if not line.strip():
                continue
            seen += 1
            if (seen - 1) % every:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def tokens_per_second(spec: str, params: int | None, device: str, *, scoring: bool = False) -> float | None:
    """Training throughput for a model on ``gpu`` or ``cpu`` (``scoring``: of importance scoring's passes)."""
    table = SCORING_THROUGHPUT if scoring else THROUGHPUT
    if spec in table:
        return table[spec][device]
    if not params:
        return None
    return min(MAX_SMALL_MODEL_TOKENS_S[device], SUSTAINED_FLOPS[device] / (6.0 * params))


def estimate_job(
    cfg,
    *,
    resolved,
    examples: list[dict[str, Any]],
    n_tool: int,
    n_general: int,
    has_validation_file: bool,
    device: str,
    gpu_memory_gb: float,
    gpus: int | None = None,
    n_examples: int | None = None,
) -> dict[str, Any]:
    """The estimate for an engine config ``cfg`` (a ``FinetuneConfig``) over the training ``examples``;
    ``gpus`` is what one job trains on (None: not known here, one assumed). With ``n_examples``, ``examples``
    is already a sample of that many (:func:`read_examples`), counted as it is."""
    from citi_engine.budget import plan_stages
    from citi_engine.errors import BudgetError

    hp = cfg.hyperparameters
    notes: list[str] = []
    # Large files: count an even sample (the estimate is rough anyway, and the API must answer quickly).
    if n_examples is None:
        n_examples = len(examples)
        sample = examples[::max(1, len(examples) // MAX_COUNTED_EXAMPLES)]
    else:
        sample = examples
    lengths, how = count_tokens(sample, resolved)
    lengths = [min(n, hp.max_length) for n in lengths] or [0]
    mean_tokens = sum(lengths) / max(len(lengths), 1)
    total_tokens = int(round(mean_tokens * n_examples))

    held_out = 0
    if not has_validation_file and cfg.test_fraction > 0:
        held_out = max(3, int(round(n_tool * cfg.test_fraction))) if n_tool else 0
    train_tool = max(0, n_tool - held_out)
    general = n_general if cfg.uses_general_data else 0
    replay = 0
    if cfg.method == "citi" and n_general == 0:
        replay = hp.replay_examples
        notes.append(f"no general examples in the file: the job first builds {replay} replay examples with the "
                     "base model")
    n_train = train_tool + general + replay
    per_step = hp.batch_size * hp.gradient_accumulation_steps
    natural = [max(1, math.ceil(e * n_train / per_step)) for e in cfg.stage_epochs()]
    tokens_per_step = mean_tokens * per_step
    budget_error = None
    try:
        plan = plan_stages(list(cfg.stages), cfg.stage_epochs(), natural, cfg.budget, tokens_per_step=tokens_per_step)
        steps = plan.steps
    except BudgetError as exc:
        budget_error = exc
        steps = natural
    total_steps = sum(steps)
    trained_tokens = int(total_steps * tokens_per_step)

    n_gpus = (gpus or 1) if device == "gpu" else 1
    if device == "gpu" and gpus is None:
        notes.append("assumes one GPU per job: set CITI_GPUS_PER_JOB on the API too when workers train on several")
    if n_gpus > 2:
        notes.append(f"the speed-up on {n_gpus} GPUs assumes the scaling measured on 2 (bench/results/throughput.md)")

    shape = model_shape(resolved)
    params, linear = parameter_counts(shape) if shape else (None, None)
    tps = tokens_per_second(resolved.spec, params, device)
    breakdown: dict[str, float] = {}
    if tps:
        breakdown["load_model"] = 5.0 + (params or 0) * 2 / 1e9
        breakdown["training"] = trained_tokens / (tps * (n_gpus * DDP_EFFICIENCY if n_gpus > 1 else 1))
        if cfg.method == "citi":
            scored = min(hp.importance_examples, train_tool) + min(hp.importance_examples, general + replay)
            breakdown["importance"] = scored * mean_tokens * 2 / tokens_per_second(resolved.spec, params, device,
                                                                                     scoring=True)
        if replay:
            breakdown["replay"] = replay * hp.replay_max_new_tokens / DECODE_TOKENS_S[device] * 4
        n_eval = min(hp.eval_examples, held_out if not has_validation_file else hp.eval_examples)
        if n_eval or hp.eval_probes:
            breakdown["evaluation"] = (n_eval * 64 + hp.eval_probes * 128) / DECODE_TOKENS_S[device] * 4
    else:
        notes.append("the model's size is unknown here (a hub model): time and memory are not estimated")
    seconds = round(sum(breakdown.values()), 1)
    breakdown = {k: round(v, 1) for k, v in breakdown.items()}

    memory: dict[str, Any] = {"gpu_memory_gb": gpu_memory_gb, "estimated_gb": None, "fits": None}
    if params:
        if cfg.method == "full":
            trainable = params
        elif cfg.method == "lora":
            trainable = int(linear * 2 * cfg.components.lora_rank / max(shape["hidden_size"], 1))
        else:
            c = cfg.components
            lora = linear * c.molora_fraction * 2 * c.rank * c.num_experts / max(shape["hidden_size"], 1)
            trainable = int(linear * c.uco_fraction + lora)
        weight_bytes = 2 if device == "gpu" else 4
        seq = min(hp.max_length, max(lengths))
        activations = per_step / hp.gradient_accumulation_steps * seq * (
            shape["hidden_size"] * shape["num_hidden_layers"] * 34 + shape["vocab_size"] * 8)
        total = params * weight_bytes + trainable * 16 + activations + 1.0e9
        memory.update(estimated_gb=round(total / 1024**3, 2), trainable_parameters=trainable,
                      fits=bool(total / 1024**3 <= gpu_memory_gb * 0.9))

    budget_info: dict[str, Any] = {**asdict(cfg.budget), "fits": budget_error is None, "limited_by": []}
    if budget_error is not None:
        budget_info["message"] = budget_error.message
    else:
        if cfg.budget.max_steps is not None and total_steps < sum(natural):
            budget_info["limited_by"].append("max_steps")
        if cfg.budget.max_tokens is not None and cfg.budget.max_tokens < sum(natural) * tokens_per_step:
            budget_info["limited_by"].append("max_tokens")
        if cfg.budget.max_seconds is not None and seconds and seconds > cfg.budget.max_seconds:
            budget_info["limited_by"].append("max_seconds")
            budget_info["fits"] = False
            budget_info["message"] = (f"the job is estimated at {seconds:.0f} s, more than max_seconds="
                                      f"{cfg.budget.max_seconds:g}; it will train fewer steps to finish in time")
    return {
        "model": cfg.model,
        "method": cfg.method,
        "examples": n_examples,
        "tool_examples": n_tool,
        "general_examples": n_general,
        "tokens": {"total": total_tokens, "mean_per_example": round(mean_tokens, 1), "max": max(lengths),
                   "counted_with": how, "examples_counted": len(sample)},
        "steps": {"total": total_steps, "per_stage": dict(zip(cfg.stages, steps, strict=True)),
                  "without_budget": sum(natural), "examples_per_step": per_step,
                  "training_examples": n_train, "held_out_test_examples": held_out},
        "trained_tokens": trained_tokens,
        "estimated_seconds": seconds,
        "seconds_breakdown": breakdown,
        "device": device,
        "gpus": n_gpus if device == "gpu" else 0,
        "throughput_tokens_per_s": tps,
        "parameters": params,
        "memory": memory,
        "budget": budget_info,
        "notes": notes,
    }
