"""CITI engine: importance-guided MOLoRA + UCO fine-tuning for tool calling.

Importing this package is light (no torch): the API process imports the data schemas and the
validator from here. The training path lives in submodules that import torch themselves.
"""

__version__ = "0.1.0"

DEFAULT_MODEL = "smollm2-135m-instruct"

__all__ = ["DEFAULT_MODEL", "__version__"]
