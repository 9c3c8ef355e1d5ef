"""The ``citi`` service commands against the real API: submit (uploading a local file), jobs, status,
watch and download; and the installed ``citi`` entry point finds them."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from citi_engine.cli import client
from tests.service.conftest import KEYS, ROOT, to_jsonl, training_lines

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
