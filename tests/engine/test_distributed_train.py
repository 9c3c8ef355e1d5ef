"""A job trained by two data-parallel processes (torchrun, CPU, gloo) on a tiny real model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.engine.test_train import assert_same_adapter, small_config, tiny_model, write_data  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("ddp_finetune.py")


def _torchrun(spec: dict, tmp_path: Path, nproc: int = 2) -> list[dict]:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    # Its own process group, so a timeout takes torchrun's workers down with it (no orphan left waiting in a
    # collective for a peer that is gone).
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         str(SCRIPT), str(spec_file)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return [json.loads((Path(spec["results"]) / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_two_processes_train_the_adapter_one_process_trains(tiny_model, tmp_path):  # noqa: F811
    """Each process trains half of every step (two of its four micro-batches, accumulated) and DDP sums the
    gradients: both processes end with the very same weights, the step and token counts are the whole
    job's, rank 0 alone writes the adapter, and that adapter matches the one-process run's. Replay and
    importance run once (rank 0) and are shared. A cancel seen by rank 1 alone stops both processes."""

    from citi_engine.adapter import load_adapter
    from citi_engine.train import finetune

    data = write_data(tmp_path, n_tool=12, n_general=0)  # no general data: rank 0 builds the replay

    def config(out: Path, **extra):
        return small_config(tiny_model, data, out, budget={"max_steps": 6}, seed=3,
                            hyperparameters={"gradient_accumulation_steps": 4}, **extra)

    single = finetune(config(tmp_path / "single"))
    results = tmp_path / "results"
    results.mkdir()
    ranks = _torchrun({"results": str(results), "config": config(tmp_path / "ddp").to_dict(),
                       "cancel_config": config(tmp_path / "cancel").to_dict()}, tmp_path)

    r0, r1 = ranks
    assert r0["sha256"] and r0["sha256"] == r1["sha256"]
    assert r0["steps"] == r1["steps"] == single.steps == 6
    assert r0["stage_steps"] == r1["stage_steps"] == single.stage_steps
    assert r0["trained_tokens"] == r1["trained_tokens"] == single.trained_tokens
    assert r0["selected_components"] == r1["selected_components"] == single.selected_components
    assert r0["progress"] == [1, 2, 3, 4, 5, 6] and r1["events"] == 0  # one process speaks for the job

    assert_same_adapter(tmp_path / "single", tmp_path / "ddp", rtol=1e-4, atol=1e-6)
    model, _ = load_adapter(tmp_path / "ddp")
    assert any("molora_router" in n for n, _ in model.named_parameters())

    assert r0["cancelled"] and r1["cancelled"]
    assert r0["cancel_progress"][:2] == [1, 2] and len(r0["cancel_progress"]) <= 3
    assert r0["group_left_alone"] and r1["group_left_alone"]
    assert not (tmp_path / "cancel" / "adapter_model.safetensors").exists()
