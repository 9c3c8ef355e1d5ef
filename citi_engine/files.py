"""Files written whole or not at all.

A job's records (its report, its adapter's ``citi_job.json``, the importance scores, a benchmark's result) are read
by other processes while they are written: the API serves them, a pool merges them, a test process reads the
cached tokenizer. Each is written to a temporary file beside its target, flushed to disk, and renamed over the
target, so a reader sees the old file or the new one and never half of one. The temporary name is unique, so two
writers of the same file cannot interleave their bytes either; the last rename wins.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` (creating its folder) so that readers never see a partial file; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 1) -> Path:
    """Write ``data`` as JSON to ``path`` whole or not at all (values JSON lacks, such as paths, become strings)."""
    return write_text_atomic(path, json.dumps(data, indent=indent, default=str) + "\n")
