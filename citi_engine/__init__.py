"""CITI engine: importance-guided MOLoRA + UCO fine-tuning for tool calling.

Importing this package is light (no torch): the API process imports the data schemas and the
validator from here. The training path lives in submodules that import torch themselves.
"""

__version__ = "0.1.0"

DEFAULT_MODEL = "smollm2-135m-instruct"
# KV caches of the decode loop (citi_engine.generate.generate_ids, citi_engine.serving.generate): growing with the
# replies, allocated once per batch, allocated once and each step replayed from a CUDA graph, or that with the step
# compiled by torch.compile first (its small kernels fused) and then captured.
# ``auto`` (the default of jobs and of the inference server) is ``cuda_graphs`` on a GPU and ``dynamic`` elsewhere
# (:func:`resolve_decode`).
DECODE_MODES = ("auto", "dynamic", "static", "cuda_graphs", "compiled_graphs")
# The modes that capture a CUDA graph on a GPU (each decodes over a static KV cache, as ``static`` does elsewhere).
GRAPH_MODES = ("cuda_graphs", "compiled_graphs")
# How the balancing loss totals an example's router weights: the paper's sum over its tokens, or their mean.
ROUTING_BALANCES = ("sum", "mean")
# How a MOLoRA router turns its N+1 logits into the backbone's and the experts' weights: one softmax over all of them
# (the paper's), or the backbone's share as a sigmoid of its own logit and the experts sharing the rest by a softmax
# among themselves (citi_engine.molora.layer.router_gates).
ROUTING_GATES = ("softmax", "sigmoid")


def resolve_decode(decode: str, device_type: str) -> str:
    """The decode loop ``decode`` names on a device of ``device_type`` (``"cuda"``, ``"cpu"``...).

    ``auto`` picks CUDA graphs on a GPU: on an H100 they decoded SmolLM2 7-10x faster than the dynamic cache
    through the whole HTTP path, with the same 15 of 20 tool questions right (bench/results/gpu_service.md), and
    jobs' evaluations and the server decode alike, so served replies are decoded as the job's evaluation decoded
    them. Elsewhere ``auto`` is the dynamic cache, whose finished rows leave the batch (graphs need a GPU).
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode == "auto":
        return "cuda_graphs" if device_type == "cuda" else "dynamic"
    return decode


__all__ = ["DECODE_MODES", "DEFAULT_MODEL", "GRAPH_MODES", "ROUTING_BALANCES", "ROUTING_GATES", "__version__",
           "resolve_decode"]
