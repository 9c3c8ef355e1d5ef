"""The whole service on one GPU host, without containers: a job over HTTP from upload to a served adapter.

The same processes `docker compose up` starts (Redis, the API, one Celery worker owning the GPU, the inference
server), started the way ``make demo`` starts them (``scripts/demo.py``), then driven over HTTP only:

1. upload the training and test splits, create a CITI job, follow its event stream to ``succeeded`` and time
   its parts (queue, validation, replay, importance, each stage, evaluation, upload), download the adapter;
2. ask ``--chat-requests`` tool questions of the test split through ``/v1/chat/completions`` with the official
   ``openai`` client, ``--chat-concurrency`` at a time, and judge the parsed calls (AST, as ``citi eval``);
3. two jobs queued at once on the one worker: they run one after the other; the GPU memory each job's process
   held (``nvidia-smi``, sampled) and that it was returned when the job ended;
4. ``kill -9`` of the worker in stage 2 right after a periodic checkpoint there, a new worker, and the job
   resumed from that checkpoint;
5. chat latency through the HTTP endpoint, streamed: time to first token and per token, 1 and 16 concurrent
   clients, the base model against the adapter, for each of ``--latency-decodes`` (the inference server starts in
   the first, which step 2 uses, and is started again with ``CITI_INFERENCE_DECODE`` set for each after it; the
   tool questions of step 2 asked again in each of those).
6. the main job's training part against ``bench/quality.py`` training the same way on the same card
   (:func:`compare_with_quality`; the service may add at most 5%).

Writes ``OUT/gpu_service.json`` after every step (everything measured so far, with the card and commit), at the
end the same as Markdown tables (``OUT/gpu_service.md``; ``--render JSON`` writes it again from a JSON), and the
services' logs under ``OUT/logs``. On a machine without a GPU it runs the same steps (memory is then not sampled): with a tiny model
and a few steps it is the script's own check (``bench/gpu_service.sh --cpu-check``).

    python bench/gpu_service.py --model /path/smollm2.gguf --data .data/bfcl --out /tmp/gs
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(Path(__file__).resolve().parent) not in sys.path:  # bench/, for provenance when loaded from elsewhere
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit  # noqa: E402

_spec = importlib.util.spec_from_file_location("citi_demo", ROOT / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

TERMINAL = ("succeeded", "failed", "cancelled")


# ------------------------------------------------------------------------------------------ helpers


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


class GpuMemory:
    """Samples ``nvidia-smi`` every ``interval`` s in a thread: the most memory each process id held."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak: dict[int, int] = {}
        self.last_seen: dict[int, float] = {}
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True)
            now = time.time()
            for line in out.stdout.splitlines():
                pid, mib = (int(x) for x in line.split(","))
                self.peak[pid] = max(self.peak.get(pid, 0), mib)
                self.last_seen[pid] = now
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuMemory:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()


def follow(client: httpx.Client, job_id: str, timeout_s: float, on_event=None) -> tuple[dict, list[dict]]:
    """Every event of the job, through its SSE stream (reconnecting after the last seen), until it ends."""
    last_id, events = 0, []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            for event in demo.sse_events(client, f"/jobs/{job_id}/events", last_id):
                last_id = int(event.get("seq", last_id))
                event["received_at"] = time.time()
                events.append(event)
                if on_event is not None:
                    on_event(event)
        except (httpx.TransportError, json.JSONDecodeError):
            time.sleep(1.0)
        job = demo.checked(client.get(f"/jobs/{job_id}"), "reading the job").json()
        if job["status"] in TERMINAL:
            return job, events
    raise demo.DemoError(f"job {job_id} did not end within {timeout_s:.0f} s")


def phase_times(events: list[dict], created_at: float, ended_at: float) -> dict[str, float]:
    """Seconds spent in each phase, from the event that starts it to the one that starts the next.

    Only stage events (``"<stage> started"``) start a phase: messages and checkpoints name a stage too, and
    the plan a CITI job announces before training ("stage molora trains N parameters") names all three at once.
    """
    marks: list[tuple[str, float]] = [("queued", created_at)]
    for e in events:
        data = e.get("data") or {}
        phase = data.get("stage") if e.get("type") == "stage" else None
        when = float(e.get("created_at") or e["received_at"])
        if phase and phase != marks[-1][0] and phase not in {m for m, _ in marks}:
            marks.append((phase, when))
    marks.append(("end", ended_at))
    return {name: round(marks[i + 1][1] - t, 2) for i, (name, t) in enumerate(marks[:-1])}


def create_job(client: httpx.Client, body: dict) -> tuple[dict, float]:
    t0 = time.time()
    job = demo.checked(client.post("/v1/fine_tuning/jobs", json=body), "creating a job").json()
    return job, t0


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines[:limit] if limit else lines


# ------------------------------------------------------------------------------------------ steps


def chat_accuracy(api: str, key: str, model: str, cases: list[dict], concurrency: int) -> dict:
    """The test cases' questions through /v1/chat/completions with the ``openai`` client, judged by AST."""
    from openai import OpenAI

    from citi_engine.evaluate.judge import judge
    from citi_engine.evaluate.tool_eval import cases_from_dicts

    client = OpenAI(base_url=f"{api}/v1", api_key=key, timeout=600, max_retries=0)

    def one(tc) -> dict:
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model=model, messages=tc.messages, tools=tc.tools, temperature=0,
                                               max_tokens=256)
        msg = reply.choices[0].message
        calls = [{"type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                 for c in msg.tool_calls or []]
        verdict = judge(calls, tc.ground_truth, tc.tools, text=msg.content or "")
        return {"id": tc.id, "seconds": time.perf_counter() - t0, "calls": len(calls), "correct": verdict.correct,
                "reason": verdict.reason, "finish_reason": reply.choices[0].finish_reason}

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, cases_from_dicts(cases)))
    return {"requests": len(results), "concurrency": concurrency, "wall_s": time.perf_counter() - t0,
            "with_tool_calls": sum(r["calls"] > 0 for r in results), "correct": sum(r["correct"] for r in results),
            "p50_s": percentile([r["seconds"] for r in results], 50), "results": results}


def stream_latency(api: str, key: str, model: str, question: dict, clients: int, rounds: int,
                   max_tokens: int) -> dict:
    """Streamed chat through the HTTP endpoint: time to first token and per token, ``clients`` at once."""
    ttft, per_token = [], []

    def one(_: int) -> None:
        body = {"model": model, "messages": question["messages"], "temperature": 0, "max_tokens": max_tokens,
                "stream": True}
        with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:
            t0 = time.perf_counter()
            first = last = None
            chunks = 0
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    delta = json.loads(line[5:])["choices"][0].get("delta") or {}
                    if delta.get("content"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        chunks += 1
            if first is not None:
                ttft.append(first - t0)
                if chunks > 1:
                    per_token.append((last - first) / (chunks - 1))

    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients * rounds)))
    return {"clients": clients, "requests": clients * rounds, "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99), "per_token_p50_s": percentile(per_token, 50),
            "per_token_p99_s": percentile(per_token, 99)}


TRAINING_PHASES = ("validating", "loading", "replay", "importance", "router_pretraining", "molora", "uco", "saving")


def compare_with_quality(args: argparse.Namespace, model_path: Path, out: Path, phases: dict[str, float]) -> dict:
    """The main job's training part against ``bench/quality.py`` training the same way on the same card.

    The service's part is the job's phases from ``validating`` to ``saving`` (its process start, queueing and its
    own evaluation left out); the benchmark's is its ``train_seconds`` (``finetune`` from loading the model to
    saving the adapter, the same steps). Same data, seed 0, budget and hyperparameters; the benchmark's own
    evaluation is cut to a few cases, it is not timed. Target: the service adds at most 5%.
    """
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--model", str(model_path), "--method", "citi",
           "--seed", "0", "--split", "test", "--data", args.data, "--out", str(out / "quality_compare"),
           "--limit-test", "4", "--probe-limit", "2", "--no-humaneval", "--force",
           # the job's replay answers decode as the job's do (its default: auto)
           "--decode", args.hyperparameters.get("generation_decode", "auto")]
    if args.limit_train:
        cmd += ["--limit-train", str(args.limit_train)]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    for name, value in args.hyperparameters.items():
        cmd += ["--set", f"hyperparameters.{name}={json.dumps(value)}"]
    with (out / "logs" / "quality_compare.log").open("w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    record = json.loads(next((out / "quality_compare").glob("*.json")).read_text())
    service = round(sum(phases.get(name, 0.0) for name in TRAINING_PHASES), 2)
    bench = round(record["train_seconds"], 2)
    return {"service_train_s": service, "quality_train_s": bench, "service_over_quality": round(service / bench - 1, 4),
            "phases_counted": list(TRAINING_PHASES), "quality_n_train": record.get("n_train"),
            "quality_steps": record.get("steps"), "note": "--limit-train takes the first N examples here and a "
            "fixed sample in bench/quality.py: compare full-size runs" if args.limit_train else None}


def restart_inference(services, decode: str) -> None:
    """Stop the inference server and start it again on its port, decoding with ``decode``."""
    services.stop(timeout=30, prefix="inference")
    env = dict(services.env, CITI_INFERENCE_DECODE=decode)
    demo.start_inference(services, env, name=f"inference-{decode}")
    demo.wait_http(f"{env['CITI_INFERENCE_URL']}/healthz", services, 120, f"the inference server ({decode})")


def worker_pid(services) -> int:
    return next(p.pid for name, p in services.procs if name.startswith("worker"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--render", type=Path, metavar="JSON", help="only write a gpu_service.json as Markdown (to --md)")
    p.add_argument("--md", type=Path, help="with --render: where the Markdown goes (default: beside the JSON)")
    p.add_argument("--model", help="model spec (a .gguf file or model folder; its folder is allowed through "
                   "CITI_MODEL_DIRS)")
    p.add_argument("--data", default=str(ROOT / ".data" / "bfcl"), help="folder with train.jsonl and test.jsonl")
    p.add_argument("--out")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N examples")
    p.add_argument("--limit-test", type=int, default=None, help="evaluate the job on the first N test cases")
    p.add_argument("--max-steps", type=int, default=None, help="budget of the main job (default: none, the "
                   "quality benchmark's settings)")
    p.add_argument("--small-steps", type=int, default=30, help="budget of the queue and kill jobs")
    p.add_argument("--hyperparameters", type=json.loads, default={}, metavar="JSON")
    p.add_argument("--chat-requests", type=int, default=20)
    p.add_argument("--chat-concurrency", type=int, default=8)
    p.add_argument("--latency-rounds", type=int, default=3)
    p.add_argument("--latency-tokens", type=int, default=64)
    p.add_argument("--latency-decodes", default="cuda_graphs,dynamic",
                   help="comma list of the inference server's decode modes (CITI_INFERENCE_DECODE) the latency step "
                        "times: the server starts in the first (cuda_graphs: what its default, auto, is on a GPU) and "
                        "the chat step asks in it; it is started again for each mode after, which also answers the "
                        "chat step's tool questions again")
    p.add_argument("--steps", default="job,chat,queue,kill,latency,compare", help="comma list of the steps to run")
    p.add_argument("--job-timeout", type=float, default=3600)
    args = p.parse_args()
    if args.render:
        md = args.md or args.render.with_suffix(".md")
        md.write_text(render(json.loads(args.render.read_text())))
        print(f"wrote {md}")
        return 0
    if not (args.model and args.out):
        p.error("--model and --out are needed to run the service (or --render JSON to write one as Markdown)")
    steps = set(args.steps.split(","))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_path = Path(args.model).resolve()
    os.environ["CITI_MODEL_DIRS"] = str(model_path.parent)
    data = Path(args.data)
    result: dict = {"model": str(model_path.name), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "commit": commit(), "card": _card()}
    key = "sk-" + secrets.token_urlsafe(16)
    services = demo.Services(out)

    def save() -> None:  # after every step, so a run cut short still leaves what it measured
        (out / "gpu_service.json").write_text(json.dumps(result, indent=1))

    try:
        t0 = time.perf_counter()
        decodes = args.latency_decodes.split(",")
        # The server starts in the first mode, named (the chat step's mode; the latency step's first)
        urls = demo.start_services(services, key, extra_env={"CITI_MODEL_DIRS": str(model_path.parent),
                                                             "CITI_INFERENCE_DECODE": decodes[0]})
        result["services_start_s"] = round(time.perf_counter() - t0, 2)
        result["chat_decode"] = httpx.get(f"{urls['inference']}/healthz", timeout=30).json().get("decode")
        if steps & {"job", "compare"}:
            # The model loaded once before anything is timed, as the job will load it: a GGUF's first load writes
            # its plain copy (citi_engine.models), which every later load reads; so the job and bench/quality.py
            # find the same cache and a host's later jobs are what is timed.
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import sys; from citi_engine.models import load_model; "
                            "load_model(sys.argv[1])", str(model_path)], cwd=ROOT, env=services.env, check=True)
            result["model_first_load_s"] = round(time.perf_counter() - t0, 2)
        api = urls["api"]
        client = httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        train = data / "train.jsonl"
        if args.limit_train:
            train = out / "train.jsonl"
            train.write_text("\n".join(json.dumps(x) for x in read_jsonl(data / "train.jsonl", args.limit_train)) + "\n")
        test_cases = read_jsonl(data / "test.jsonl")
        test = out / "test.jsonl"
        test.write_text("\n".join(json.dumps(x) for x in test_cases[: args.limit_test or len(test_cases)]) + "\n")
        t0 = time.perf_counter()
        train_file, test_file = demo.upload(client, train), demo.upload(client, test)
        result["upload_s"] = round(time.perf_counter() - t0, 2)
        base_body = {"model": str(model_path), "training_file": train_file["id"], "validation_file": test_file["id"],
                     "method": {"type": "citi", "hyperparameters": dict(args.hyperparameters)}}

        def job_body(max_steps: int | None, suffix: str) -> dict:
            body = json.loads(json.dumps(base_body))
            body["suffix"] = suffix
            if max_steps:
                body["budget"] = {"max_steps": max_steps}
            return body

        fine_tuned = None
        if "job" in steps:
            with GpuMemory() as mem:
                job, created = create_job(client, job_body(args.max_steps, "main"))
                job, events = follow(client, job["id"], args.job_timeout)
            ended = time.time()
            if job["status"] != "succeeded":
                raise demo.DemoError(f"the main job {job['status']}: {job.get('error')}")
            t0 = time.perf_counter()
            with client.stream("GET", f"/jobs/{job['id']}/adapter") as r:
                r.raise_for_status()
                size = sum(len(chunk) for chunk in r.iter_bytes())
            report = client.get(f"/jobs/{job['id']}/report").json()
            fine_tuned = job["fine_tuned_model"]
            result["job"] = {
                "id": job["id"], "post_to_succeeded_s": round(ended - created, 2),
                "phases_s": phase_times(events, created, ended), "adapter_bytes": size,
                "adapter_download_s": round(time.perf_counter() - t0, 2), "trained_tokens": job.get("trained_tokens"),
                "report_summary": report.get("summary"), "gpu_peak_mib": mem.peak,
            }
            (out / "main_events.json").write_text(json.dumps(events))
            print(f"main job: {result['job']['post_to_succeeded_s']} s, phases {result['job']['phases_s']}",
                  flush=True)
            save()
        cases = [c for c in test_cases if c.get("ground_truth")][: args.chat_requests]
        if "chat" in steps and fine_tuned:
            result["chat"] = chat_accuracy(api, key, fine_tuned, cases, args.chat_concurrency)
            print(f"chat: {result['chat']['correct']}/{result['chat']['requests']} correct", flush=True)
            save()
        if "queue" in steps:
            with GpuMemory() as mem:
                jobs = [create_job(client, job_body(args.small_steps, f"queue{i}"))[0] for i in range(2)]
                done = [follow(client, j["id"], args.job_timeout) for j in jobs]
            spans = []
            for job, events in done:
                started = min((float(e.get("created_at", 0)) for e in events
                               if (e.get("data") or {}).get("stage") not in (None, "queued")), default=None)
                # each queued job is the kill step's job run through: its report is the uninterrupted one to compare
                summary = (client.get(f"/jobs/{job['id']}/report").json() or {}).get("summary") \
                    if job["status"] == "succeeded" else None
                spans.append({"id": job["id"], "status": job["status"], "started_at": started,
                              "finished_at": job.get("finished_at"), "report_summary": summary})
            result["queue"] = {"jobs": spans, "one_after_the_other": bool(
                spans[1]["started_at"] and spans[0]["finished_at"] and spans[1]["started_at"] >= spans[0]["finished_at"]),
                "gpu_peak_mib_by_pid": mem.peak,
                "gpu_pids_still_holding_memory_at_end": sorted(
                    pid for pid, seen in mem.last_seen.items() if seen >= time.time() - 2 * mem.interval - 1)}
            print(f"queue: {result['queue']['one_after_the_other']}", flush=True)
            save()
        if "kill" in steps:
            killed = {}

            def kill_in_stage_two(event: dict) -> None:
                # right after a periodic checkpoint of stage 2 (a "step-..." one, not the stage's start), so the
                # new worker has a checkpoint inside the stage to resume from
                data = event.get("data") or {}
                if (not killed and event.get("type") == "checkpoint" and data.get("stage") == "molora"
                        and "-step-" in str(data.get("checkpoint"))):
                    pid = worker_pid(services)
                    os.killpg(pid, signal.SIGKILL)
                    killed.update(at=time.time(), step=data.get("step"), pid=pid, after=data["checkpoint"])
                    services.procs = [(n, pr) for n, pr in services.procs if pr.pid != pid]
                    demo.start_worker(services, services.env, name="worker-after-kill")

            body = job_body(args.small_steps, "kill")
            body["checkpoint_every"] = 2
            job, created = create_job(client, body)
            job, events = follow(client, job["id"], args.job_timeout, on_event=kill_in_stage_two)
            resumed = [e for e in events if "resum" in str(e.get("message", "")).lower()]
            result["kill"] = {"id": job["id"], "status": job["status"], "killed": killed,
                              # a periodic checkpoint: the latest before the kill, all of them in stage 2
                              "resumed_within_stage_two": any("checkpoint step-" in str(e.get("message"))
                                                              for e in resumed),
                              "resumed_messages": [e.get("message") for e in resumed],
                              "report_summary": (client.get(f"/jobs/{job['id']}/report").json() or {}).get("summary")
                              if job["status"] == "succeeded" else None,
                              "post_to_end_s": round(time.time() - created, 2)}
            print(f"kill: {job['status']}, killed at {killed}", flush=True)
            save()
        if "latency" in steps and fine_tuned:
            question = {"messages": [{"role": "user", "content": "Name three rivers in Europe."}]}
            models = (("base", str(model_path)), ("adapter", fine_tuned))
            result["latency"] = []
            for i, decode in enumerate(decodes):
                try:
                    if i:
                        restart_inference(services, decode)
                        for _, model in models:  # the model's and the adapter's first load are not timed
                            stream_latency(api, key, model, question, 1, 1, 4)
                        if "chat" in steps:
                            result.setdefault("chat_by_decode", {})[decode] = chat_accuracy(
                                api, key, fine_tuned, cases, args.chat_concurrency)
                    result["latency"] += [stream_latency(api, key, model, question, clients, args.latency_rounds,
                                                         args.latency_tokens) | {"model": label, "decode": decode}
                                          for clients in (1, 16) for label, model in models]
                    print(f"latency ({decode}): {result['latency'][-4:]}", flush=True)
                except Exception as exc:  # noqa: BLE001 - a mode that fails (HTTP, openai, start) must not cost the steps after
                    if not i:
                        raise
                    result.setdefault("latency_errors", {})[decode] = repr(exc)[:2000]
                    print(f"latency ({decode}) failed: {exc!r}", flush=True)
                save()
        if "compare" in steps and "job" in result:
            result["compare"] = compare_with_quality(args, model_path, out, result["job"]["phases_s"])
            print(f"compare: {result['compare']}", flush=True)
            save()
    finally:
        save()
        (out / "gpu_service.md").write_text(render(result))
        services.stop()
    return 0


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _tool_acc(summary: dict | None) -> str:
    return _num((summary or {}).get("tool_accuracy"))


def _clock(epoch_s: float | None) -> str:
    return "n/a" if epoch_s is None else time.strftime("%H:%M:%S", time.gmtime(epoch_s))


def render(result: dict) -> str:
    """``gpu_service.json`` as Markdown tables, one section per step that ran (``--render``)."""
    lines = [f"# The whole service on one host ({result.get('card', 'unknown card')})", "",
             f"`bench/gpu_service.py`, commit {result.get('commit', 'unknown')}, model {result.get('model')}, started "
             f"{result.get('started')}; services started in {result.get('services_start_s')} s, both splits uploaded "
             f"in {result.get('upload_s')} s" + (f"; the base model's first load (which writes a GGUF's plain copy) "
                                                  f"{result['model_first_load_s']} s" if "model_first_load_s" in result
                                                  else "") + ".", ""]
    job = result.get("job")
    if job:
        summary = job.get("report_summary") or {}
        phases = job.get("phases_s") or {}
        lines += ["## The main job, from `POST /jobs` to `succeeded`", "",
                  f"{job['post_to_succeeded_s']} s in all; adapter {job.get('adapter_bytes', 0) / 1e6:.1f} MB, "
                  f"downloaded in {job.get('adapter_download_s')} s; {job.get('trained_tokens')} tokens trained; "
                  f"GPU memory at its peak, by process (MiB): {job.get('gpu_peak_mib') or 'not sampled'}.", "",
                  "| " + " | ".join(phases) + " |", "|" + "---:|" * len(phases),
                  "| " + " | ".join(f"{v:g}" for v in phases.values()) + " |", "",
                  f"The job's own evaluation: tool accuracy {_tool_acc(summary)}, irrelevance "
                  f"{_num(summary.get('irrelevance_accuracy'))}, headline retention "
                  f"{_num(summary.get('headline_retention'), 4)}, backbone gate general / tool call "
                  f"{_num(summary.get('backbone_gate_general'))} / {_num(summary.get('backbone_gate_tool_call'))}, "
                  f"call threshold {_num(summary.get('call_threshold'), 2)}.", ""]
    first = result.get("chat_decode") or "dynamic"  # runs before the sixteenth session recorded none: dynamic then
    chats = {**({f"{first} (first)": result["chat"]} if result.get("chat") else {}),
             **(result.get("chat_by_decode") or {})}
    if chats:
        lines += ["## Tool questions through `/v1/chat/completions` (the official `openai` client)", "",
                  "| server decode | requests | at a time | with tool calls | judged correct (AST) | p50 s | wall s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {mode} | {c['requests']} | {c['concurrency']} | {c['with_tool_calls']} | {c['correct']} | "
                  f"{c['p50_s']:.2f} | {c['wall_s']:.1f} |" for mode, c in chats.items()]
        lines.append("")
    queue = result.get("queue")
    if queue:
        lines += ["## Two jobs queued at once on a worker that owns one GPU", "",
                  f"One after the other: **{'yes' if queue['one_after_the_other'] else 'no'}**. GPU memory at its "
                  f"peak, by process (MiB): {queue.get('gpu_peak_mib_by_pid') or 'not sampled'}; processes still "
                  f"holding GPU memory at the end: {queue.get('gpu_pids_still_holding_memory_at_end') or 'none'}.", "",
                  "| job | status | started (UTC) | finished (UTC) | tool accuracy |", "|---|---|---:|---:|---:|"]
        lines += [f"| {j['id']} | {j['status']} | {_clock(j['started_at'])} | {_clock(j['finished_at'])} | "
                  f"{_tool_acc(j.get('report_summary'))} |" for j in queue["jobs"]]
        lines.append("")
    kill = result.get("kill")
    if kill:
        killed = kill.get("killed") or {}
        unbroken = [_tool_acc(j.get("report_summary")) for j in (queue or {}).get("jobs", [])]
        lines += ["## `kill -9` of the worker in stage 2, then a new worker", "",
                  f"Killed at step {killed.get('step', 'n/a')} right after checkpoint {killed.get('after', 'n/a')}; "
                  f"the job ended **{kill['status']}** {kill.get('post_to_end_s')} s after its `POST`; resumed within "
                  f"stage 2: **{'yes' if kill.get('resumed_within_stage_two') else 'no'}** "
                  f"({'; '.join(kill.get('resumed_messages') or []) or 'no resume message'}). Tool accuracy "
                  f"{_tool_acc(kill.get('report_summary'))}, against {', '.join(unbroken) or 'n/a'} for the same job "
                  "run through without a kill (the queued ones).", ""]
    if result.get("latency"):
        lines += ["## Streamed chat latency through the HTTP endpoint", "",
                  "| server decode | model | clients | requests | TTFT p50 ms | TTFT p99 ms | per token p50 ms | "
                  "per token p99 ms |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {row.get('decode', 'dynamic')} | {row['model']} | {row['clients']} | {row['requests']} | "
                  f"{_ms(row['ttft_p50_s'])} | {_ms(row['ttft_p99_s'])} | {_ms(row['per_token_p50_s'])} | "
                  f"{_ms(row['per_token_p99_s'])} |" for row in result["latency"]]
        lines.append("")
    for decode, error in (result.get("latency_errors") or {}).items():
        lines += [f"The server in `{decode}` mode failed: `{error[:300]}`", ""]
    compare = result.get("compare")
    if compare:
        over = compare["service_over_quality"]
        lines += ["## The service's training part against `bench/quality.py` on the same card", "",
                  f"Service {compare['service_train_s']} s (phases {', '.join(compare['phases_counted'])}), "
                  f"benchmark {compare['quality_train_s']} s: the service adds {over:+.1%} (target at most +5%: "
                  f"**{'met' if over <= 0.05 else 'missed'}**)." + (f" {compare['note']}." if compare.get("note") else ""),
                  ""]
    return "\n".join(lines)


def _card() -> str:
    if not shutil.which("nvidia-smi"):
        return "CPU (no GPU)"
    r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "unknown GPU"


if __name__ == "__main__":
    sys.exit(main())
