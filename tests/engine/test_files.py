"""Records written whole or not at all (citi_engine.files)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from citi_engine.files import write_json_atomic, write_text_atomic


def test_json_lands_whole_in_a_new_folder_and_paths_become_strings(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "report.json"
    assert write_json_atomic(target, {"adapter": tmp_path, "n": 3}) == target
    assert json.loads(target.read_text()) == {"adapter": str(tmp_path), "n": 3}
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "citi_job.json"
    write_json_atomic(target, {"version": 1})
    with pytest.raises(TypeError):
        write_text_atomic(target, 123)  # type: ignore[arg-type]  (fails after the temporary file exists)
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["citi_job.json"]


def test_writers_racing_on_one_file_leave_one_of_their_records_whole(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    records = [{"writer": i, "rows": list(range(2000))} for i in range(8)]
    threads = [threading.Thread(target=write_json_atomic, args=(target, r)) for r in records]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads(target.read_text()) in records
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
