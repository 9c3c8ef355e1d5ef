"""Load a base model and its tokenizer from a model spec (see :mod:`citi_engine.specs`)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from citi_engine.errors import ModelSpecError
from citi_engine.specs import ResolvedSpec, hub_offline, resolve_model_spec

log = logging.getLogger(__name__)


def default_device() -> str:
    """``cuda`` where a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU. Trained weights keep fp32 master copies either way (see train.py)."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def _as_dtype(dtype: Any, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in names:
        raise ValueError(f"unknown dtype '{dtype}': use one of {sorted(names)}")
    return names[dtype]


# Tokenizers already loaded in this process, by source and its files' modification time: a job reads the
# tokenizer to validate lengths and again with the model (seconds each for a GGUF file, which is parsed whole).
_TOKENIZERS: dict[tuple, Any] = {}


def _tokenizer_key(resolved: ResolvedSpec) -> tuple | None:
    source = Path(resolved.path) / resolved.gguf_file if resolved.gguf_file else Path(resolved.path)
    if resolved.kind == "hub" or not source.exists():
        return None
    parts = ("token", "vocab", "merges", "template", "spiece", "config")  # what a tokenizer reads, not weights
    files = [source] if source.is_file() else sorted(p for p in source.iterdir()
                                                     if p.is_file() and any(w in p.name for w in parts))
    return (str(source), tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files))


def _load_from(resolved: ResolvedSpec, load):
    """``load()`` for a resolved spec, every failure to get the files a :class:`ModelSpecError` naming the spec.

    A hub id fails at once when the hub cannot be reached (the hub client would retry for about a minute).
    """
    spec = resolved.spec
    if resolved.kind == "hub" and hub_offline():
        raise ModelSpecError(
            f"model '{spec}' is a hub id, but the hub cannot be reached from here (offline, or HF_HUB_OFFLINE=1): "
            "download it where the hub can be reached and pass its local directory instead",
            code="model_unavailable_offline",
            param="model",
        )
    try:
        return load()
    except OSError as exc:  # hub unreachable, missing files
        if resolved.kind == "hub":
            raise ModelSpecError(
                f"could not download model '{spec}' from the hub ({exc.__class__.__name__}); check the name and the "
                "network, or pass a local directory",
                code="model_unavailable_offline",
                param="model",
            ) from exc
        raise ModelSpecError(f"could not load model '{spec}': {exc}", code="model_not_found", param="model") from exc


def load_tokenizer(resolved: ResolvedSpec):
    """The tokenizer of a resolved spec, with a pad token set (the EOS token when it has none).

    Loaded once per process and source (reloaded when its files change); callers must not modify it.
    """
    from transformers import AutoTokenizer

    key = _tokenizer_key(resolved)
    if key is not None and key in _TOKENIZERS:
        return _TOKENIZERS[key]
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    source = resolved.path
    plain = _plain_copy(resolved)
    if plain is not None and (plain / "tokenizer").is_dir():
        source = str(plain / "tokenizer")
    elif resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    tok = _load_from(resolved, lambda: AutoTokenizer.from_pretrained(source, **kwargs))
    if plain is not None and source == resolved.path:
        _keep_plain_copy(plain / "tokenizer", tok.save_pretrained)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if key is not None:
        _TOKENIZERS[key] = tok
    return tok


def load_model(
    spec: str,
    *,
    device: str | None = None,
    dtype: Any = None,
    model_dirs: list[str] | None = None,
):
    """Resolve ``spec`` and return ``(model, tokenizer)``, the model in eval mode on ``device``.

    Offline, a hub id fails at once with a :class:`ModelSpecError` naming the spec (never a hang).
    ``trust_remote_code`` is never enabled.
    """
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_spec(spec, model_dirs=model_dirs)
    device = device or default_device()
    torch_dtype = _as_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": False}
    source = resolved.path
    plain = _plain_copy(resolved)
    copy = plain / str(torch_dtype).removeprefix("torch.") if plain is not None else None
    if copy is not None and (copy / "config.json").is_file():
        source = str(copy)
    elif resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    tokenizer = load_tokenizer(resolved)
    model = _load_from(resolved, lambda: AutoModelForCausalLM.from_pretrained(source, **kwargs))
    if copy is not None and source == resolved.path:
        from citi_engine.adapter import _gguf_marks_dropped

        def save(directory: Path) -> None:
            with _gguf_marks_dropped(model):
                model.save_pretrained(directory)

        _keep_plain_copy(copy, save)
    elif copy is not None:  # named as if read from the GGUF (peft records it in adapter_config.json)
        model.name_or_path = model.config._name_or_path = resolved.path
    model.to(device)
    model.eval()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.citi_spec = spec  # remembered in adapter metadata
    return model, tokenizer


def cache_dir() -> str:
    """Where the engine caches derived files (e.g. the tokenizer extracted from the GGUF)."""
    return os.environ.get("CITI_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "citi"))


# --------------------------------------------------------------------------------------------------
# GGUF files, kept as plain copies
# --------------------------------------------------------------------------------------------------
# transformers reads a GGUF file slowly: it parses the whole file once for the config, once for the tokenizer and
# once for the weights, and builds its tensor-name map once per tensor (about 25 s for SmolLM2-135M on 2 CPU
# cores; a job's whole loading phase took 18 s on an H100 host), against a second or two for the same weights as
# safetensors). So the first load of a GGUF file in a dtype writes the model it made (the dequantised weights cast
# to that dtype: the same numbers a GGUF load gives) and its tokenizer as plain Hugging Face directories under the
# cache directory, and later loads read those.


def _plain_copy(resolved: ResolvedSpec) -> Path | None:
    """The directory of a GGUF spec's plain copies (``tokenizer/``, one folder per dtype), existing or not;
    ``None`` for other specs or with ``CITI_GGUF_CACHE=0``. Its name changes with the file (size, modification
    time) and the transformers release that converts it, so a stale copy is never read."""
    if not resolved.gguf_file or os.environ.get("CITI_GGUF_CACHE", "1") == "0":
        return None
    import transformers

    source = Path(resolved.path) / resolved.gguf_file
    try:
        st = source.stat()
    except OSError:
        return None  # the load itself says what is missing
    name = f"{source.stem}-{st.st_size}-{st.st_mtime_ns}-transformers{transformers.__version__}"
    return Path(cache_dir()) / "gguf-plain" / name


def _keep_plain_copy(target: Path, save) -> None:
    """``save(directory)`` into a new directory renamed to ``target`` at the end (atomic: of two processes writing
    the same copy, the second's is dropped). A cache that cannot be written (read-only, full) only costs speed."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        save(tmp)
        os.replace(tmp, target)
    except Exception as exc:  # noqa: BLE001 - the copy is optional: a full disk may surface as safetensors' own error
        if not target.is_dir():
            log.warning("could not keep a plain copy of a GGUF model in %s (%s): it is read from the GGUF file "
                        "each time", target, exc)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
