"""What a benchmark records of where it ran: the commit of its code, the CPU, the library versions.

One place for it, so every result names its code the same way: a run from uncommitted changes is marked
``+dirty`` (it must not pass for the commit it started from), and a copy of the tree without ``.git`` (the
snapshot a GPU machine gets) names its commit in ``CITI_COMMIT``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commit(short: bool = False) -> str | None:
    """``CITI_COMMIT`` when set, else HEAD of the checkout (``--short`` when ``short``), with ``+dirty`` when
    tracked files differ from it; None without git or a checkout."""
    if os.environ.get("CITI_COMMIT"):
        return os.environ["CITI_COMMIT"]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", *(["--short"] if short else []), "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """torch, transformers, peft, Python and CUDA versions."""
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": sys.version.split()[0], "cuda": str(torch.version.cuda)}


def write_results(out: Path, name: str, doc: dict, render) -> None:
    """``out/<name>.json`` (the whole record, written atomically) and ``out/<name>.md`` (``render(doc)``)."""
    from citi_engine.files import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{name}.json", doc)
    (out / f"{name}.md").write_text(render(doc))
    print(f"wrote {out / f'{name}.md'}")
