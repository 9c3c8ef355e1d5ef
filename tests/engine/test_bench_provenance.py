"""bench/provenance.py: every benchmark names the commit of its code the same way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import provenance  # noqa: E402


def test_the_commit_is_the_checkouts_head_and_a_copy_names_its_own(monkeypatch) -> None:
    monkeypatch.delenv("CITI_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    assert provenance.commit() == head + ("+dirty" if dirty else "")
    assert head.startswith(provenance.commit(short=True).removesuffix("+dirty"))
    monkeypatch.setenv("CITI_COMMIT", "8c24ba4")  # a snapshot without .git, as a GPU machine gets
    assert provenance.commit() == "8c24ba4"
