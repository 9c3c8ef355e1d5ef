"""CITI engine: importance-guided MOLoRA + UCO fine-tuning for tool calling.

Importing this package is light (no torch): the API process imports the data schemas and the
validator from here. The training path lives in submodules that import torch themselves.
"""

__version__ = "0.1.0"

DEFAULT_MODEL = "smollm2-135m-instruct"
# KV caches of the decode loop (citi_engine.generate.generate_ids, citi_engine.serving.generate): growing with the
# replies, allocated once per batch, allocated once and each step replayed from a CUDA graph, or that with the step
# compiled by torch.compile first (its small kernels fused) and then captured.
DECODE_MODES = ("dynamic", "static", "cuda_graphs", "compiled_graphs")
# The modes that capture a CUDA graph on a GPU (each decodes over a static KV cache, as ``static`` does elsewhere).
GRAPH_MODES = ("cuda_graphs", "compiled_graphs")
# How the balancing loss totals an example's router weights: the paper's sum over its tokens, or their mean.
ROUTING_BALANCES = ("sum", "mean")
# How a MOLoRA router turns its N+1 logits into the backbone's and the experts' weights: one softmax over all of them
# (the paper's), or the backbone's share as a sigmoid of its own logit and the experts sharing the rest by a softmax
# among themselves (citi_engine.molora.layer.router_gates).
ROUTING_GATES = ("softmax", "sigmoid")

__all__ = ["DECODE_MODES", "DEFAULT_MODEL", "GRAPH_MODES", "ROUTING_BALANCES", "ROUTING_GATES", "__version__"]
