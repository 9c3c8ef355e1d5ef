"""A data-parallel CITI job through the worker on several GPUs (the multi-GPU issue), over HTTP only.

The processes of the GPU host run (``bench/gpu_service.py``: Redis, the API, one Celery worker owning every GPU,
the inference server), then:

1. ``single``: one CITI job with ``CITI_GPUS_PER_JOB=1``;
2. ``all``: the same job with every GPU (the worker restarted with ``CITI_GPUS_PER_JOB=N``; torchrun, NCCL, one
   process a GPU). Wall time of each job's training part (its router, MOLoRA and UCO stages, from the job's own
   events), the scaling, and both adapters' tool accuracy and retention from their job reports;
3. ``shape``: a model with the 8B shape and random weights (built here into a folder under ``CITI_MODEL_DIRS``)
   through the same worker path, a small step budget: trained tokens/s per GPU from the job's events, to hold
   against ``bench/throughput.py`` on the same card (``--throughput-json``);
4. ``kill``: ``kill -9`` of one training process (rank 1) during stage 2 of an all-GPU job: how the job ends,
   whether it resumed from its checkpoint, and how long from the kill to its end.

Writes ``OUT/multi_gpu.json`` (the card, GPU count and commit with everything measured) and the services' logs.
``--cpu`` is the script's own check on a machine without GPUs: the same steps with CPU training processes over
gloo (``CITI_DEVICE=cpu``, ``--gpus`` of them) and a tiny model; its times say nothing about GPUs.

    python bench/multi_gpu.py --model /path/smollm2.gguf --out /tmp/mg                  # GPU host, all GPUs
    python bench/multi_gpu.py --cpu --gpus 2 --model /tmp/tiny --out /tmp/mg-cpu ...     # CPU check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import httpx
from provenance import commit

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("citi_gpu_service", ROOT / "bench" / "gpu_service.py")
gs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gs)
demo = gs.demo

# The job's phases that are training (the stage names its events carry); the rest is validation, replay,
# importance scoring, evaluation and upload.
TRAINING_PHASES = ("router_pretraining", "molora", "uco", "train")
# Llama-3-8B's shape (bench/throughput.py builds the same one in memory).
SHAPE_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0}


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def build_shape_model(folder: Path, tokenizer_from: str, tiny: bool) -> Path:
    """A Llama model with the 8B shape (``tiny``: a small one, for the CPU check) and random bf16 weights, saved
    with the built-in model's tokenizer so jobs can train on it. Built once; a folder that exists is reused."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from citi_engine.models import load_model

    _, tokenizer = load_model(tokenizer_from, device="cpu", dtype=torch.float32,
                              model_dirs=[str(Path(tokenizer_from).parent)])
    shape = dict(SHAPE_8B)
    if tiny:
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    shape["vocab_size"] = len(tokenizer)
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)  # fails here, not in the worker, if the folder is incomplete
    return folder


def training_seconds(phases: dict[str, float]) -> float:
    return round(sum(v for k, v in phases.items() if k in TRAINING_PHASES), 2)


def trained_tokens_per_s(trained_tokens: int | None, training_s: float) -> float | None:
    """Tokens trained per second of the job's training phases (all processes together)."""
    return round(trained_tokens / training_s, 1) if trained_tokens and training_s > 0 else None


def training_pids(worker_pid: int) -> list[tuple[int, int]]:
    """(rank, pid) of the job's training processes under ``worker_pid`` (torchrun's children read RANK)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "worker.runner" not in cmd:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in item)
        except OSError:
            continue
        if "RANK" in env and _descends_from(int(entry.name), worker_pid):
            found.append((int(env["RANK"]), int(entry.name)))
    return sorted(found)


def _descends_from(pid: int, ancestor: int) -> bool:
    """True when ``ancestor`` is on ``pid``'s chain of parents (torchrun starts its processes in new sessions)."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return False


def restart_worker(services, gpus_per_job: int, name: str) -> None:
    """Stop the running worker and start one whose jobs train on ``gpus_per_job`` processes."""
    pid = gs.worker_pid(services)
    os.killpg(pid, signal.SIGTERM)
    for _ in range(100):
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    services.procs = [(n, p) for n, p in services.procs if p.pid != pid]
    services.env["CITI_GPUS_PER_JOB"] = str(gpus_per_job)
    demo.start_worker(services, services.env, name=name)


def run_job(client: httpx.Client, body: dict, timeout_s: float, on_event=None) -> dict:
    job, created = gs.create_job(client, body)
    job, events = gs.follow(client, job["id"], timeout_s, on_event=on_event)
    ended = time.time()
    phases = gs.phase_times(events, created, ended)
    report = client.get(f"/jobs/{job['id']}/report").json() if job["status"] == "succeeded" else {}
    return {"id": job["id"], "status": job["status"], "error": job.get("error"),
            "post_to_end_s": round(ended - created, 2), "phases_s": phases, "training_s": training_seconds(phases),
            "trained_tokens": job.get("trained_tokens"),
            "tokens_per_s": trained_tokens_per_s(job.get("trained_tokens"), training_seconds(phases)),
            "report_summary": (report or {}).get("summary"), "_events": events}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the built-in model's GGUF or any model folder")
    p.add_argument("--data", default=str(ROOT / ".data" / "bfcl"), help="folder with train.jsonl and test.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--gpus", type=int, default=None, help="processes of the all-GPU job (default: every visible GPU)")
    p.add_argument("--cpu", action="store_true", help="the CPU check: training processes on the CPU over gloo")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="budget of the single and all-GPU jobs")
    p.add_argument("--shape-steps", type=int, default=20, help="budget of the 8B-shaped job")
    p.add_argument("--kill-steps", type=int, default=30, help="budget of the kill job")
    p.add_argument("--kill-at-step", type=int, default=3, help="kill rank 1 once stage 2 reports this step")
    p.add_argument("--hyperparameters", type=json.loads, default={}, metavar="JSON")
    p.add_argument("--shape-hyperparameters", type=json.loads, default={"batch_size": 8, "importance_examples": 16,
                   "replay_examples": 8, "eval_examples": 0, "eval_probes": 0, "eval_humaneval": 0}, metavar="JSON")
    p.add_argument("--steps", default="single,all,shape,kill", help="comma list of the steps to run")
    p.add_argument("--shape-dir", default=None, help="where the 8B-shaped model is built (default OUT/shape8b)")
    p.add_argument("--throughput-json", default=None, help="bench/throughput.py's result for the same shape and "
                   "card (citi_stage2, packed), to compare tokens/s per GPU with")
    p.add_argument("--job-timeout", type=float, default=3600)
    args = p.parse_args()
    steps = set(args.steps.split(","))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n = args.gpus or (0 if args.cpu else visible_gpus())
    if n < 2:
        raise SystemExit("fewer than 2 GPUs visible: this benchmark needs a multi-GPU host (or --cpu --gpus 2)")
    model_path = Path(args.model).resolve()
    shape_dir = Path(args.shape_dir or out / "shape8b").resolve()
    dirs = ",".join(str(d) for d in (model_path.parent, shape_dir.parent))
    env = {"CITI_MODEL_DIRS": dirs, "CITI_GPUS_PER_JOB": "1"}
    if args.cpu:
        env["CITI_DEVICE"] = "cpu"
    result: dict = {"model": model_path.name, "gpus": n, "cpu_check": args.cpu, "card": gs._card(),
                    "commit": commit(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    key = "sk-" + secrets.token_urlsafe(16)
    services = demo.Services(out)
    try:
        urls = demo.start_services(services, key, extra_env=env)
        client = httpx.Client(base_url=urls["api"], headers={"Authorization": f"Bearer {key}"}, timeout=120)
        train = out / "train.jsonl"
        train.write_text("".join(json.dumps(x) + "\n" for x in gs.read_jsonl(Path(args.data) / "train.jsonl",
                                                                              args.limit_train)))
        test = out / "test.jsonl"
        test.write_text("".join(json.dumps(x) + "\n" for x in gs.read_jsonl(Path(args.data) / "test.jsonl",
                                                                             args.limit_test)))
        train_file, test_file = demo.upload(client, train), demo.upload(client, test)

        def body(model: str, max_steps: int | None, suffix: str, hyper: dict) -> dict:
            b = {"model": model, "training_file": train_file["id"], "validation_file": test_file["id"],
                 "suffix": suffix, "method": {"type": "citi", "hyperparameters": dict(hyper)}}
            if max_steps:
                b["budget"] = {"max_steps": max_steps}
            return b

        jobs: dict[str, dict] = {}
        for name, count in (("single", 1), ("all", n)):
            if name not in steps:
                continue
            if count != int(services.env.get("CITI_GPUS_PER_JOB", "1")):
                restart_worker(services, count, f"worker-{count}")
            with gs.GpuMemory() as mem:
                jobs[name] = run_job(client, body(str(model_path), args.max_steps, name, args.hyperparameters),
                                     args.job_timeout)
            jobs[name]["processes"] = count
            jobs[name]["gpu_peak_mib_by_pid"] = mem.peak
            (out / f"{name}_events.json").write_text(json.dumps(jobs[name].pop("_events")))
            print(f"{name}: {jobs[name]['status']} in {jobs[name]['post_to_end_s']} s, training "
                  f"{jobs[name]['training_s']} s", flush=True)
        result["jobs"] = jobs
        if "single" in jobs and "all" in jobs and jobs["all"]["training_s"]:
            result["training_speedup"] = round(jobs["single"]["training_s"] / jobs["all"]["training_s"], 3)
        if "shape" in steps:
            t0 = time.perf_counter()
            build_shape_model(shape_dir, str(model_path), tiny=args.cpu)
            result["shape_build_s"] = round(time.perf_counter() - t0, 1)
            if int(services.env.get("CITI_GPUS_PER_JOB", "1")) != n:
                restart_worker(services, n, f"worker-{n}-shape")
            shape = run_job(client, body(str(shape_dir), args.shape_steps, "shape8b", args.shape_hyperparameters),
                            args.job_timeout)
            (out / "shape_events.json").write_text(json.dumps(shape.pop("_events")))
            if shape["tokens_per_s"]:
                shape["tokens_per_s_per_gpu"] = round(shape["tokens_per_s"] / n, 1)
            if args.throughput_json and shape.get("tokens_per_s_per_gpu"):
                bench = json.loads(Path(args.throughput_json).read_text())
                shape["throughput_bench_tokens_per_s"] = bench.get("tokens_per_s")
                if bench.get("tokens_per_s"):
                    shape["service_overhead"] = round(1 - shape["tokens_per_s_per_gpu"] / bench["tokens_per_s"], 3)
            result["shape"] = shape
            print(f"shape: {shape['status']}, {shape.get('tokens_per_s_per_gpu')} tokens/s per GPU", flush=True)
        if "kill" in steps:
            if int(services.env.get("CITI_GPUS_PER_JOB", "1")) != n:
                restart_worker(services, n, f"worker-{n}-kill")
            killed: dict = {}

            def kill_rank_one(event: dict) -> None:
                data = event.get("data") or {}
                if killed or data.get("stage") != "molora" or (data.get("step") or 0) < args.kill_at_step:
                    return
                ranks = dict(training_pids(gs.worker_pid(services)))
                if 1 in ranks:
                    os.kill(ranks[1], signal.SIGKILL)
                    killed.update(at=time.time(), step=data.get("step"), pid=ranks[1], ranks_seen=sorted(ranks))

            kill_body = body(str(model_path), args.kill_steps, "kill", args.hyperparameters)
            kill_body["checkpoint_every"] = 2
            job = run_job(client, kill_body, args.job_timeout, on_event=kill_rank_one)
            events = job.pop("_events")
            (out / "kill_events.json").write_text(json.dumps(events))
            job["killed"] = killed
            job["resumed_messages"] = [e.get("message") for e in events if "resum" in str(e.get("message", "")).lower()]
            if killed:
                job["kill_to_end_s"] = round(events[-1]["received_at"] - killed["at"], 2) if events else None
            result["kill"] = job
            print(f"kill: {job['status']}, killed {killed}, resumed {bool(job['resumed_messages'])}", flush=True)
    finally:
        (out / "multi_gpu.json").write_text(json.dumps(result, indent=1, default=str))
        services.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
