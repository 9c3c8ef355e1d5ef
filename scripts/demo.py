"""The first run (``make demo``): one small CITI job end to end, through the HTTP API only.

What it does, in order:

1. starts, in the background and on free ports, everything the service needs: a private Redis
   (when ``redis-server`` is installed; else the one at ``REDIS_URL``), the API
   (``uvicorn api.main:app``), one Celery worker and the inference server
   (``uvicorn worker.inference.app:app``), with their files and logs under ``.run/demo/``;
2. then talks to the API like any user would, over HTTP with one API key: uploads the example
   data, submits a CITI job on the built-in SmolLM2-135M-Instruct with a demo-sized budget,
   follows the job's live event stream as a progress bar, downloads the adapter, asks a tool
   question through ``/v1/chat/completions`` and prints the answer and the job's report;
3. stops everything it started, also on Ctrl-C or an error.

The budget is sized for a 2-core CPU (about 4 minutes when nothing else runs): six optimizer steps
over the three stages, importance scored on 32 examples, an evaluation on 4 test cases. That shows every part of the service working;
it does not teach a 135M model to call tools. The README's benchmark tables show what CITI reaches
with a real budget on a GPU.

Usage: ``python scripts/demo.py [--max-steps N] [--keep]``
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markdown import Markdown
from rich.panel import Panel
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RUN_DIR = ROOT / ".run" / "demo"
MODEL = "smollm2-135m-instruct"
TERMINAL = ("succeeded", "failed", "cancelled")
QUESTION = "What's the weather like in Paris right now? Please answer in celsius."

# Demo-sized job: every stage runs, each briefly. Field names are the engine's (POST /jobs body).
DEMO_HYPERPARAMETERS = {
    "batch_size": 4,
    "max_length": 1024,
    "importance_examples": 16,
    "importance_batch_size": 4,
    "eval_examples": 4,
    "eval_probes": 4,
    "eval_humaneval": 2,
    # Without general examples the job would let the base model write some (replay); keep that small.
    "replay_examples": 8,
    "replay_max_new_tokens": 64,
}

console = Console()


class DemoError(RuntimeError):
    """Something the demo cannot get past; the message says how to fix it."""


# ------------------------------------------------------------------------------ the services


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_answers(host: str, port: int) -> bool:
    """True when a Redis server answers PING at host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Services:
    """The background processes of the demo: started in order, stopped in reverse, always."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.env: dict[str, str] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start ``cmd`` in its own process group (so stopping it stops its children), logging to a file."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=self.run_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()  # the child holds its own copy
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        """Raise :class:`DemoError` with the log's tail if a service has exited."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise DemoError(f"{name} exited with status {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 25) -> str:
        """The last lines of a service's log."""
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0, prefix: str = "") -> None:
        """SIGTERM each process group, newest first; SIGKILL what is still there after ``timeout``. ``prefix``:
        only the services whose name starts with it (the others keep running)."""
        chosen = [(name, proc) for name, proc in self.procs if name.startswith(prefix)]
        for name, proc in reversed(chosen):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            try:
                # The leader may be gone while a child it started (a training process) is not.
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            console.print(f"  stopped {name}")
        self.procs = [item for item in self.procs if item not in chosen]


def wait_http(url: str, services: Services, timeout: float, what: str) -> None:
    """Wait until ``url`` answers 200, failing early if a service dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        services.check_alive()
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise DemoError(f"{what} did not answer at {url} within {timeout:.0f} s")


def start_worker(services: Services, env: dict[str, str], name: str = "worker") -> subprocess.Popen:
    """One Celery worker on the service's queue (one job at a time), logging to ``logs/<name>.log``."""
    return services.start(name, [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                                 "--loglevel=INFO", "--concurrency=1", "-Q", env["CITI_QUEUE"],
                                 f"--hostname={name}-{secrets.token_hex(3)}@%h"], env)


def start_inference(services: Services, env: dict[str, str], name: str = "inference") -> subprocess.Popen:
    """The inference server on the port of ``env``'s ``CITI_INFERENCE_URL``, logging to ``logs/<name>.log``."""
    port = env["CITI_INFERENCE_URL"].rsplit(":", 1)[1]
    return services.start(name, [sys.executable, "-m", "uvicorn", "worker.inference.app:app", "--host", "127.0.0.1",
                                 "--port", port, "--log-level", "warning"], env)


def start_services(services: Services, api_key: str, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Start Redis (if needed), the API, a worker and the inference server; returns their URLs.

    ``extra_env`` adds settings of the service's own (``CITI_MODEL_DIRS``, ``CITI_DEVICE``); the environment
    the processes got is kept as ``services.env`` (to start another worker later)."""
    run_dir = services.run_dir
    if shutil.which("redis-server"):
        # A private Redis: the demo's jobs and queue never meet another service's or test's.
        port = free_port()
        services.start("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(run_dir)], dict(os.environ))
        deadline = time.monotonic() + 10
        while not redis_answers("127.0.0.1", port):
            services.check_alive()
            if time.monotonic() > deadline:
                raise DemoError("redis-server did not start within 10 s")
            time.sleep(0.05)
        redis_url = f"redis://127.0.0.1:{port}/0"
    else:
        redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        host_port = redis_url.split("//", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
        host, _, port_text = host_port.partition(":")
        if not redis_answers(host or "127.0.0.1", int(port_text or 6379)):
            raise DemoError(f"no redis-server installed and no Redis answering at {redis_url}: run `make setup` "
                            "(it installs redis-server where it can) or set REDIS_URL to a running Redis")

    api_port, inference_port = free_port(), free_port()
    # Only what the demo sets: a CITI_* setting or a .env meant for docker compose must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITI_") and k != "REDIS_URL"}
    env.update({
        "REDIS_URL": redis_url,
        "CITI_API_KEYS": f"demo:{api_key}",
        "CITI_STORAGE": "local",
        "CITI_ARTIFACT_DIR": str(run_dir / "artifacts"),
        "CITI_INFERENCE_URL": f"http://127.0.0.1:{inference_port}",
        "CITI_INFERENCE_TOKEN": secrets.token_urlsafe(24),
        "CITI_QUEUE": f"citi-demo-{secrets.token_hex(4)}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra_env or {})
    services.env = env
    py = sys.executable
    services.start("api", [py, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(api_port),
                           "--log-level", "warning"], env)
    start_worker(services, env)
    start_inference(services, env)
    api = f"http://127.0.0.1:{api_port}"
    wait_http(f"{api}/healthz", services, 60, "the API")
    wait_http(f"{env['CITI_INFERENCE_URL']}/healthz", services, 120, "the inference server")
    return {"api": api, "redis": redis_url, "inference": env["CITI_INFERENCE_URL"]}


# ------------------------------------------------------------------------------ the user's side


def api_error(response: httpx.Response) -> str:
    """The API's error message, with its per-line details when there are any."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:500]}"
    lines = [f"HTTP {response.status_code} {error.get('code')}: {error.get('message')}"]
    lines += [f"  line {d.get('line')}: {d.get('code')}: {d.get('message')}" for d in error.get("details") or []]
    return "\n".join(lines)


def checked(response: httpx.Response, what: str) -> httpx.Response:
    """``response`` if it succeeded, else :class:`DemoError` naming the step."""
    if response.is_success:
        return response
    raise DemoError(f"{what} failed: {api_error(response)}")


def upload(client: httpx.Client, path: Path) -> dict:
    """``POST /v1/files``: one JSONL file, purpose fine-tune."""
    with path.open("rb") as f:
        response = client.post("/v1/files", data={"purpose": "fine-tune"},
                               files={"file": (path.name, f, "application/jsonl")})
    file = checked(response, f"uploading {path.name}").json()
    console.print(f"  {path.name}: {file['id']} ({file['n_examples']} examples: {file['n_tool']} tool, "
                  f"{file['n_general']} general)")
    return file


def sse_events(client: httpx.Client, path: str, last_id: int) -> Iterator[dict]:
    """Events of one SSE connection (``data:`` lines decoded), from after ``last_id``."""
    headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last_id)}
    with client.stream("GET", path, headers=headers, timeout=httpx.Timeout(10.0, read=60.0)) as response:
        checked(response, "opening the event stream")
        data: list[str] = []
        for line in response.iter_lines():
            if line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                yield json.loads("\n".join(data))
                data = []


def describe(event: dict) -> str | None:
    """A one-line account of an event worth printing above the progress bar, or None."""
    data = event.get("data") or {}
    kind = data.get("type") or event.get("type")
    if kind in ("progress",):
        return None
    message = event.get("message") or data.get("message")
    return f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}" if message else None


def watch(client: httpx.Client, job_id: str) -> dict:
    """Follow the job's live event stream as a progress bar until it ends; returns the final job."""
    progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description:<20}"), BarColumn(),
                        TextColumn("{task.fields[steps]:>9}"), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), console=console)
    last_id, job, last_print = 0, {}, 0.0
    with progress:
        bar = progress.add_task("queued", total=None, info="", steps="")
        while True:
            try:
                for event in sse_events(client, f"/jobs/{job_id}/events", last_id):
                    last_id = int(event.get("seq", last_id))
                    line = describe(event)
                    if line is None and not console.is_terminal and time.monotonic() - last_print > 15:
                        # No live bar without a terminal (a log, a pipe): a progress line now and then.
                        line = f"[dim]{time.strftime('%H:%M:%S')}[/dim] {event.get('message')}"
                    if line:
                        last_print = time.monotonic()
                        progress.console.print(line)
                    data = event.get("data") or {}
                    stage = data.get("stage") or data.get("status")
                    if stage:
                        progress.update(bar, description=str(stage))
                    if data.get("total_steps"):
                        step_now = data.get("step") or 0
                        progress.update(bar, total=data["total_steps"], completed=step_now,
                                        steps=f"{step_now}/{data['total_steps']}")
                    info = []
                    if data.get("loss") is not None:
                        info.append(f"loss {data['loss']:.3f}")
                    if data.get("eta_s") is not None:
                        info.append(f"eta {data['eta_s']:.0f}s")
                    if info:
                        progress.update(bar, info="  ".join(info))
            except (httpx.TransportError, json.JSONDecodeError):
                time.sleep(1.0)  # the stream broke off: pick up after the last event seen
            job = checked(client.get(f"/jobs/{job_id}"), "reading the job").json()
            if job["status"] in TERMINAL:
                if job["status"] == "succeeded" and progress.tasks[0].total:
                    progress.update(bar, completed=progress.tasks[0].total)
                return job


def download_adapter(client: httpx.Client, job_id: str, dest: Path) -> Path:
    """``GET /jobs/{id}/adapter``: stream the .tar.gz to disk and unpack it; returns the adapter directory."""
    archive = dest / f"{job_id}.tar.gz"
    with client.stream("GET", f"/jobs/{job_id}/adapter", timeout=httpx.Timeout(10.0, read=120.0)) as response:
        checked(response, "downloading the adapter")
        with archive.open("wb") as f:
            for chunk in response.iter_bytes():
                f.write(chunk)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        # The "data" filter refuses absolute paths, links out of the tree and device files.
        tar.extractall(dest, filter="data")
    top = dest / names[0].split("/")[0]
    size = archive.stat().st_size / 1e6
    console.print(f"  {archive.relative_to(ROOT)} ({size:.1f} MB) -> {top.relative_to(ROOT)}/")
    for path in sorted(top.iterdir()):
        console.print(f"    {path.name}")
    return top


def ask(client: httpx.Client, model: str, tools: list[dict]) -> dict:
    """``POST /v1/chat/completions`` with tools; returns the assistant message and finish reason."""
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "tools": tools,
            "tool_choice": "auto", "temperature": 0, "max_tokens": 96}
    response = client.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(10.0, read=600.0))
    choice = checked(response, f"asking {model}").json()["choices"][0]
    return {"message": choice["message"], "finish_reason": choice["finish_reason"]}


def show_answer(title: str, answer: dict) -> None:
    """Print what a model answered, calls first."""
    message = answer["message"]
    lines = []
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        lines.append(f"tool call: {fn['name']}({fn['arguments']})")
    if message.get("content"):
        lines.append(f"text: {message['content'].strip()}")
    lines.append(f"finish_reason: {answer['finish_reason']}")
    console.print(Panel("\n".join(lines) or "(empty answer)", title=title, expand=False))


def cancel(client: httpx.Client, job_id: str, wait_s: float = 30.0) -> None:
    """Cancel the job and wait for it to end: the worker stops at its next step instead of being killed."""
    try:
        checked(client.post(f"/jobs/{job_id}/cancel", timeout=10.0), "cancelling the job")
        console.print(f"  cancelling job {job_id} ...")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            status = client.get(f"/jobs/{job_id}", timeout=5.0).json().get("status")
            if status in TERMINAL:
                console.print(f"  job {job_id}: {status}")
                return
            time.sleep(0.5)
        console.print(f"  job {job_id} had not stopped after {wait_s:.0f} s; stopping the worker anyway")
    except (httpx.HTTPError, DemoError) as exc:
        console.print(f"  could not cancel job {job_id}: {exc}")


# ------------------------------------------------------------------------------ the demo


def run_demo(args: argparse.Namespace, services: Services, timings: dict[str, float]) -> None:
    """Everything between starting the services and stopping them."""
    started = time.monotonic()
    api_key = secrets.token_urlsafe(24)
    console.rule("[bold]1. starting the service")
    urls = start_services(services, api_key)
    console.print(f"  API {urls['api']}  (docs: {urls['api']}/docs)\n  inference {urls['inference']}\n"
                  f"  Redis {urls['redis']}\n  logs {services.logs.relative_to(ROOT)}/")
    timings["start services"] = time.monotonic() - started

    client = httpx.Client(base_url=urls["api"], headers={"Authorization": f"Bearer {api_key}"},
                          timeout=httpx.Timeout(30.0))
    current_job: dict[str, str] = {}
    try:
        step = time.monotonic()
        console.rule("[bold]2. uploading the example data")
        training = upload(client, EXAMPLES / "tools_train.jsonl")
        test = upload(client, EXAMPLES / "tools_test.jsonl")
        general_path = EXAMPLES / "general.jsonl"
        general = upload(client, general_path) if general_path.exists() else None
        if general is None:
            console.print("  (no examples/general.jsonl: the job lets the base model write a few general answers)")

        console.rule("[bold]3. submitting a CITI job")
        body: dict[str, Any] = {
            "model": MODEL,
            "training_file": training["id"],
            "validation_file": test["id"],
            "suffix": "demo",
            "seed": 0,
            "method": {"type": "citi", "hyperparameters": {**DEMO_HYPERPARAMETERS, **args.hyperparameters}},
            "budget": {"max_steps": args.max_steps},
            "metadata": {"source": "make demo"},
        }
        if general is not None:
            body["general_file"] = general["id"]
        job = checked(client.post("/v1/fine_tuning/jobs", json=body), "creating the job").json()
        current_job["id"] = job["id"]
        console.print(f"  job {job['id']}: {job['status']}; budget {job.get('budget')}")
        console.print(Panel(json.dumps(body, indent=2), title="POST /v1/fine_tuning/jobs", expand=False))
        timings["upload + submit"] = time.monotonic() - step

        step = time.monotonic()
        console.rule("[bold]4. training (live events over SSE)")
        job = watch(client, job["id"])
        timings["job"] = time.monotonic() - step
        if job["status"] != "succeeded":
            error = job.get("error") or {}
            raise DemoError(f"the job ended {job['status']}: {error.get('code')}: {error.get('message')}\n"
                            f"worker log (tail):\n{services.tail('worker')}")
        current_job.clear()
        console.print(f"  succeeded: fine_tuned_model [bold]{job['fine_tuned_model']}[/bold], "
                      f"{job.get('trained_tokens')} trained tokens")
        selected = job.get("selected_components") or {}
        if selected:
            console.print(f"  MOLoRA on {len(selected.get('molora') or [])} components, "
                          f"UCO on {len(selected.get('uco') or [])}")

        step = time.monotonic()
        console.rule("[bold]5. downloading the adapter")
        adapter_dir = download_adapter(client, job["id"], services.run_dir)
        timings["download"] = time.monotonic() - step

        step = time.monotonic()
        console.rule("[bold]6. asking a tool question through /v1/chat/completions")
        tools = json.loads((EXAMPLES / "tools.json").read_text())
        console.print(f"  user: {QUESTION}\n  tools: {', '.join(t['function']['name'] for t in tools)}")
        show_answer(f"base model ({MODEL})", ask(client, MODEL, tools))
        show_answer(f"fine-tuned ({job['fine_tuned_model']})", ask(client, job["fine_tuned_model"], tools))
        console.print(
            "[yellow]Read these answers for what they are:[/yellow] a few optimizer steps on a CPU, on "
            f"{training['n_examples']} training examples, exercise every part of the service but do not teach a "
            "135M model to call tools reliably; the fine-tuned answer may be no better than the base model's. "
            "The README's benchmark tables show what CITI reaches with a real budget on a GPU.")
        timings["chat"] = time.monotonic() - step

        console.rule("[bold]7. the job's report")
        response = client.get(f"/jobs/{job['id']}/report", params={"format": "md"})
        if response.status_code == 200:
            # The plots are PNG files in the adapter directory; a terminal cannot show them inline.
            text = "\n".join(line for line in response.text.splitlines() if not line.startswith("!["))
            console.print(Markdown(text))
        else:
            console.print(f"  no report: {api_error(response)}")
        console.print(f"  adapter files: {adapter_dir.relative_to(ROOT)}/")
    except KeyboardInterrupt:
        if current_job:
            cancel(client, current_job["id"])
        raise
    finally:
        client.close()

    if args.keep:
        console.rule("[bold]services left running (--keep)")
        console.print(f"  curl -H 'Authorization: Bearer {api_key}' {urls['api']}/jobs\n  Ctrl-C stops them.")
        while True:
            services.check_alive()
            time.sleep(1.0)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """Run the demo; exit status 0 when every step worked."""
    parser = argparse.ArgumentParser(description="A small CITI job end to end through the HTTP API.")
    parser.add_argument("--max-steps", type=int, default=6,
                        help="optimizer steps over all three stages (default 6: two per stage)")
    parser.add_argument("--hyperparameters", type=json.loads, default={}, metavar="JSON",
                        help='engine hyperparameters to change, e.g. \'{"importance_examples": 32}\'')
    parser.add_argument("--keep", action="store_true", help="leave the services running at the end (Ctrl-C stops)")
    args = parser.parse_args()

    for needed in ("tools_train.jsonl", "tools_test.jsonl", "tools.json"):
        if not (EXAMPLES / needed).exists():
            console.print(f"[red]examples/{needed} is missing: the demo uploads it[/red]")
            return 1
    if RUN_DIR.exists():
        shutil.rmtree(RUN_DIR)
    RUN_DIR.mkdir(parents=True)
    # SIGTERM (e.g. from a CI runner) ends the demo like Ctrl-C: through the clean-up below.
    signal.signal(signal.SIGTERM, _interrupt)

    services = Services(RUN_DIR)
    timings: dict[str, float] = {}
    started = time.monotonic()
    status = 0
    try:
        run_demo(args, services, timings)
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted[/yellow]")
        status = 130
    except DemoError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        status = 1
    finally:
        console.rule("[bold]shutting down")
        services.stop()
    total = time.monotonic() - started
    summary = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    console.print(f"[bold]{'done' if status == 0 else 'stopped'} in {total / 60:.1f} min[/bold] ({summary}); "
                  f"files in {RUN_DIR.relative_to(ROOT)}/")
    return status


if __name__ == "__main__":
    sys.exit(main())
