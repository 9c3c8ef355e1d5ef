"""The ``citi`` service commands against the real API (and a real worker where a job must run): submit
(uploading a local file, and deleting it again when the job is refused), jobs, status, watch, download
(with its progress bar, and one-line errors), cancel, delete and files; and the installed ``citi`` entry
point finds them."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile

import pytest

from citi_engine.cli import client
from tests.service.conftest import KEYS, ROOT, TINY_HYPERPARAMETERS, to_jsonl, training_lines

pytestmark = pytest.mark.service


def citi(service, capsys, *argv: str, who: str = "alice") -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="citi")
    client.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([*argv, "--api-url", service.url, "--api-key", KEYS[who]])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_submit_uploads_a_local_file_and_status_jobs_watch_download_follow(service, capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(to_jsonl(training_lines()))
    code, out, err = citi(service, capsys, "submit", str(data), "--model", service.model_dir, "--max-steps", "3",
                          "-H", "batch_size=2", "-H", "importance_examples=4", "--suffix", "cli", "--json",
                          "--idempotency-key", "cli-1")
    assert code == 0, err
    job = json.loads(out)
    assert job["status"] == "queued" and job["suffix"] == "cli" and job["budget"]["max_steps"] == 3
    assert job["hyperparameters"]["batch_size"] == 2 and "uploaded" in err

    code, out, _ = citi(service, capsys, "jobs", "--json", "--status", "queued")
    assert code == 0 and job["id"] in [j["id"] for j in json.loads(out)["data"]]
    code, out, _ = citi(service, capsys, "status", job["id"])
    assert code == 0 and job["id"] in out and "queued" in out and "position in queue" in out

    with service.client("alice") as c:
        assert c.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    code, out, _ = citi(service, capsys, "watch", job["id"])
    assert code == 130 and "cancelled" in out
    code, out, _ = citi(service, capsys, "download", job["id"], "-o", str(tmp_path / "a.tar.gz"))
    assert code == 2 and "succeeded" in out and not (tmp_path / "a.tar.gz").exists()
    code, out, _ = citi(service, capsys, "status", job["id"], who="bob")
    assert code == 2 and "no job" in out


def test_submit_of_a_bad_file_prints_every_bad_line(service, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes((ROOT / "examples" / "bad_example.jsonl").read_bytes())
    code, out, _ = citi(service, capsys, "submit", str(bad), "--model", service.model_dir)
    assert code == 2
    assert "invalid_json" in out and out.count("line ") >= 5


def test_the_citi_entry_point_has_the_service_commands(service):
    env = {**service.env, "CITI_API_URL": service.url, "CITI_API_KEY": KEYS["bob"]}
    out = subprocess.run([sys.executable, "-m", "citi_engine.cli.main", "jobs", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["object"] == "list"
    missing = subprocess.run([sys.executable, "-m", "citi_engine.cli.main", "jobs"], cwd=ROOT,
                             env={**env, "CITI_API_KEY": ""}, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "CITI_API_KEY" in missing.stdout + missing.stderr


def tiny_flags(service) -> list[str]:
    """``citi submit`` flags for a job that runs every stage in seconds on the CPU."""
    flags = ["--model", service.model_dir, "--max-steps", "3", "--seed", "1"]
    for name, value in TINY_HYPERPARAMETERS.items():
        flags += ["-H", f"{name}={value}"]
    return flags


def file_ids(service, who: str) -> set[str]:
    with service.client(who) as c:
        return {f["id"] for f in c.get("/v1/files", params={"limit": 10000}).json()["data"]}


def test_download_to_a_path_that_cannot_be_written_is_one_line_exit_2(service, tmp_path, uploaded):
    with service.client("alice") as c:
        job = c.post("/jobs", json=service.job_body(uploaded)).json()
        c.post(f"/jobs/{job['id']}/cancel")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {**service.env, "CITI_API_URL": service.url, "CITI_API_KEY": KEYS["alice"]}
    out = subprocess.run([sys.executable, "-m", "citi_engine.cli.main", "download", job["id"], "-o",
                          str(blocker / "x" / "adapter.tar.gz")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    text = (out.stdout + out.stderr).strip()
    assert out.returncode == 2, text
    assert "Traceback" not in text and len(text.splitlines()) == 1
    assert text.startswith("error: cannot write") and f"{blocker} is a file, not a folder" in text
    assert blocker.read_text() == "not a folder"


def test_jobs_never_shorten_ids_in_a_pipe_or_on_an_80_column_terminal(service, capsys, monkeypatch, uploaded):
    with service.client("alice") as c:
        ids = []
        for _ in range(2):
            job = c.post("/jobs", json=service.job_body(uploaded, suffix="a-rather-long-suffix")).json()
            c.post(f"/jobs/{job['id']}/cancel")
            ids.append(job["id"])
    # In a pipe (pytest's captured stdout is one): tab-separated lines, the id first, nothing cut.
    code, out, _ = citi(service, capsys, "jobs", "--limit", "100")
    assert code == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    for job_id in ids:
        assert rows[job_id][1] == "cancelled" and rows[job_id][2] == service.model_dir  # the long model path whole
    # On a wide terminal: a table, the id column whole, the others folding.
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = citi(service, capsys, "jobs", "--limit", "100")
    out = re.sub(r"\x1b\[[0-9;]*m", "", out)  # colours
    assert code == 0 and "\t" not in out and "│" in out
    assert max(len(line) for line in out.splitlines()) <= 200
    for job_id in ids:
        assert any(line.startswith(f"│ {job_id} │") for line in out.splitlines())
    # On an 80-column terminal, too narrow for seven readable columns: one block a job, the id on its own line.
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = citi(service, capsys, "jobs", "--limit", "100")
    lines = re.sub(r"\x1b\[[0-9;]*m", "", out).splitlines()
    assert code == 0
    for job_id in ids:
        at = lines.index(job_id)
        assert lines[at + 1] == "  status: cancelled" and lines[at + 2] == f"  model: {service.model_dir}"


def test_submit_refused_by_the_api_deletes_the_file_it_uploaded(service, capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(to_jsonl(training_lines(seed=7)))
    before = file_ids(service, "bob")
    code, out, _ = citi(service, capsys, "submit", str(data), *tiny_flags(service), "-H", "no_such_knob=1",
                        who="bob")
    assert code == 2 and "uploaded" in out and "no_such_knob" in out
    assert "deleted file-" in out
    assert file_ids(service, "bob") == before  # no orphan left behind

    code, out, _ = citi(service, capsys, "submit", str(data), "--model", "no-such-model", who="bob")
    assert code == 2 and file_ids(service, "bob") == before


def test_submit_retried_with_the_same_idempotency_key_reuses_the_upload_and_returns_the_same_job(
        service, capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(to_jsonl(training_lines(seed=8)))
    before = file_ids(service, "bob")
    argv = ["submit", str(data), *tiny_flags(service), "--idempotency-key", "cli-retry", "--json"]
    code, out, _ = citi(service, capsys, *argv, who="bob")
    assert code == 0
    first = json.loads(out)
    code, out, err = citi(service, capsys, *argv, who="bob")
    assert code == 0, err
    assert json.loads(out)["id"] == first["id"] and "already uploaded" in err
    assert file_ids(service, "bob") - before == {first["training_file"]}
    with service.client("bob") as c:
        c.post(f"/jobs/{first['id']}/cancel")


def test_cancel_then_delete_a_job(service, capsys, uploaded):
    with service.client("alice") as c:
        job = c.post("/jobs", json=service.job_body(uploaded)).json()
    code, out, _ = citi(service, capsys, "delete", job["id"], "--yes")
    assert code == 2 and "cancel it" in out  # the API refuses an unfinished job and says what to do
    code, out, _ = citi(service, capsys, "cancel", job["id"])
    assert code == 0 and f"job {job['id']} cancelled" in out
    code, out, _ = citi(service, capsys, "cancel", job["id"])
    assert code == 0 and "cancelled" in out  # cancelling twice is no error

    code, out, _ = citi(service, capsys, "delete", job["id"])  # stdin is not a terminal: no silent yes
    assert code == 2 and "--yes" in out
    assert service.wait_status(job["id"], ("cancelled",))["status"] == "cancelled"
    code, out, _ = citi(service, capsys, "delete", job["id"], "--yes")
    assert code == 0 and f"deleted job {job['id']}" in out
    with service.client("alice") as c:
        assert c.get(f"/jobs/{job['id']}").status_code == 404
        assert c.get(f"/v1/files/{uploaded}").status_code == 200  # its file stays without --with-files


def test_files_upload_list_and_delete(service, capsys, tmp_path, uploaded):
    paths = []
    for seed in (11, 12):
        paths.append(tmp_path / f"train-{seed}.jsonl")
        paths[-1].write_bytes(to_jsonl(training_lines(seed=seed)))
    code, out, _ = citi(service, capsys, "files", "upload", *map(str, paths), "--json")
    assert code == 0
    records = json.loads(out)
    assert [r["filename"] for r in records] == [p.name for p in paths] and records[0]["n_examples"] == 24
    new = [r["id"] for r in records]

    code, out, _ = citi(service, capsys, "files", "list")
    assert code == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert set(new) | {uploaded} <= rows.keys() and rows[new[1]][1] == paths[1].name and rows[new[1]][3] == "24"

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes((ROOT / "examples" / "bad_example.jsonl").read_bytes())
    code, out, _ = citi(service, capsys, "files", "upload", str(bad))
    assert code == 2 and "invalid_json" in out

    with service.client("alice") as c:  # a file an unfinished job uses is kept
        job = c.post("/jobs", json=service.job_body(new[1])).json()
    code, out, _ = citi(service, capsys, "files", "delete", new[0], new[1], "file-nonesuch")
    assert code == 2 and f"deleted {new[0]}" in out and "file_in_use" not in out and job["id"] in out
    assert "file-nonesuch" in out
    assert new[0] not in file_ids(service, "alice") and new[1] in file_ids(service, "alice")
    with service.client("alice") as c:
        c.post(f"/jobs/{job['id']}/cancel")
    service.wait_status(job["id"], ("cancelled",))
    code, out, _ = citi(service, capsys, "files", "delete", new[1])
    assert code == 0 and new[1] not in file_ids(service, "alice")


def test_a_finished_job_downloads_with_a_progress_bar_and_deletes_with_its_files(
        service, workers, capsys, monkeypatch, tmp_path):
    workers.start("w1")
    data = tmp_path / "train.jsonl"
    data.write_bytes(to_jsonl(training_lines(seed=21)))
    code, out, err = citi(service, capsys, "submit", str(data), *tiny_flags(service), "--json")
    assert code == 0, err
    job = json.loads(out)
    done = service.wait_status(job["id"], ("succeeded", "failed", "cancelled"), timeout=300)
    assert done["status"] == "succeeded", done

    code, out, _ = citi(service, capsys, "cancel", job["id"])
    assert code == 2 and "already succeeded" in out

    # its result files (no format, no counts) are listed with the uploads, in a pipe and on a terminal
    results = done["result_files"]
    assert len(results) == 2
    code, out, _ = citi(service, capsys, "files", "list", "--limit", "100")
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert code == 0 and all(rows[r][2:5] == ["fine-tune-results", "-", "-"] for r in results), out
    assert rows[job["training_file"]][2:4] == ["train", "24"]
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    code, out, _ = citi(service, capsys, "files", "list", "--limit", "100")
    assert code == 0 and all(r in out for r in results) and "fine-tune-results" in out
    monkeypatch.delenv("TTY_COMPATIBLE")

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # a terminal: the bar is drawn
    code, out, _ = citi(service, capsys, "download", job["id"], "-o", str(tmp_path))
    out = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out)  # colours and cursor moves
    archive = tmp_path / f"{job['id']}.tar.gz"
    assert code == 0 and f"adapter saved to {archive}" in out
    assert "━" in out and "kB" in out  # the bar and the bytes it counted
    with tarfile.open(archive) as tar:
        assert f"{job['id']}/adapter_model.safetensors" in tar.getnames()
    assert not list(tmp_path.glob("*.part"))
    monkeypatch.delenv("TTY_COMPATIBLE")

    code, out, _ = citi(service, capsys, "delete", job["id"], "--yes", "--with-files")
    assert code == 0 and f"deleted job {job['id']} ({done['fine_tuned_model']})" in out
    assert f"deleted {job['training_file']}" in out
    with service.client("alice") as c:
        assert c.get(f"/jobs/{job['id']}").status_code == 404
        assert c.get(f"/v1/files/{job['training_file']}").status_code == 404
