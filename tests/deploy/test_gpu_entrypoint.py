"""docker/gpu-entrypoint.sh: how replicas of one compose service end up on different GPUs.

The script is run for real (bash, flock, its lock directory); only nvidia-smi, which no GPU here
can answer, is a stand-in that lists GPU UUIDs the way `nvidia-smi --query-gpu=uuid` does. (On a
2-GPU host the same script gave two claimants the two GPUs, torch saw one each, and a third
waited for the first to finish.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "gpu-entrypoint.sh"
GPUS = ["GPU-11111111-aaaa", "GPU-22222222-bbbb"]


@pytest.fixture()
def gpu_host(tmp_path):
    """A PATH with a stand-in nvidia-smi listing two GPUs, a lock directory, and clean-up of our processes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\n" + "".join(f"echo ' {uuid}'\n" for uuid in GPUS))
    fake.chmod(0o755)
    procs: list[subprocess.Popen] = []

    def run(claim: str | None, out: Path, hold_s: float = 0.0, path: str | None = None) -> subprocess.Popen:
        env = {"PATH": path or f"{bin_dir}:/usr/bin:/bin", "CITI_GPU_LOCK_DIR": str(tmp_path / "locks"),
               "CITI_CLAIM_RETRY_SECONDS": "0.2", "CUDA_VISIBLE_DEVICES": "untouched"}
        if claim is not None:
            env["CITI_CLAIM_GPUS"] = claim
        cmd = ["bash", str(ENTRYPOINT), "sh", "-c", f'echo "$CUDA_VISIBLE_DEVICES" > {out}; sleep {hold_s}']
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written within {timeout} s")


def test_without_a_claim_the_command_runs_as_given_even_without_a_gpu(gpu_host, tmp_path):
    for claim in (None, "all", ""):
        out = tmp_path / f"out-{claim}"
        proc = gpu_host(claim, out, path="/usr/bin:/bin")  # no nvidia-smi at all
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
        assert out.read_text().strip() == "untouched"


def test_concurrent_replicas_get_different_gpus_and_a_surplus_one_waits_for_a_free_gpu(gpu_host, tmp_path):
    first = gpu_host("1", tmp_path / "a", hold_s=1.5)
    second = gpu_host("1", tmp_path / "b", hold_s=30)
    got = {_wait_for(tmp_path / "a"), _wait_for(tmp_path / "b")}
    assert got == set(GPUS)

    third = gpu_host("1", tmp_path / "c", hold_s=0)
    time.sleep(0.6)
    assert not (tmp_path / "c").exists(), "a third replica must wait while both GPUs are held"
    assert first.wait(timeout=10) == 0
    # The first replica's GPU is free again once it exits; the waiting one takes exactly that one.
    assert _wait_for(tmp_path / "c") == _wait_for(tmp_path / "a")
    assert third.wait(timeout=10) == 0
    assert "need 1; retrying" in third.stderr.read()
    assert second.poll() is None


def test_a_killed_replica_frees_its_gpu_with_nothing_to_clean_up(gpu_host, tmp_path):
    holders = [gpu_host("1", tmp_path / name, hold_s=30) for name in ("a", "b")]
    held = {_wait_for(tmp_path / "a"): holders[0], _wait_for(tmp_path / "b"): holders[1]}
    victim_gpu = GPUS[0]
    os.killpg(held[victim_gpu].pid, signal.SIGKILL)  # no chance to run any clean-up
    held[victim_gpu].wait()
    gpu_host("1", tmp_path / "c", hold_s=0)
    assert _wait_for(tmp_path / "c") == victim_gpu


def test_a_replica_may_claim_several_gpus(gpu_host, tmp_path):
    proc = gpu_host("2", tmp_path / "out")
    assert proc.wait(timeout=10) == 0
    assert (tmp_path / "out").read_text().strip() == ",".join(GPUS)


@pytest.mark.parametrize(("claim", "path", "message"), [
    ("3", None, "sees only 2 GPU(s)"),
    ("two", None, "must be a positive whole number"),
    ("1", "/usr/bin:/bin", "sees no GPU"),
])
def test_impossible_claims_fail_at_once_with_a_fix(gpu_host, tmp_path, claim, path, message):
    proc = gpu_host(claim, tmp_path / "out", path=path)
    assert proc.wait(timeout=10) == 2
    assert message in proc.stderr.read()
    assert not (tmp_path / "out").exists()
