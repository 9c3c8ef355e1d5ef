"""``citi submit | jobs | status | watch | download``: the service client.

Talks to the API at ``CITI_API_URL`` (default ``http://127.0.0.1:8000``) with the key in ``CITI_API_KEY``
(both also given as ``--api-url`` / ``--api-key``). Uses httpx; never imports torch.

    citi submit train.jsonl --model smollm2-135m-instruct --max-steps 200 --watch
    citi jobs --status running
    citi status ftjob-...
    citi watch ftjob-...            # a live progress bar fed by the job's SSE stream
    citi download ftjob-... -o adapter.tar.gz   (or --extract DIR)

Exit codes: 0 done (a watched job succeeded), 2 a problem the user can fix (bad file, bad parameters,
a job that failed on its data or budget), 1 anything else, 130 interrupted or the job was cancelled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
USER_ERROR_CODES = ("invalid_file", "invalid_budget", "invalid_parameters", "model_not_found", "model_not_allowed",
                    "model_unavailable_offline", "too_long")
TERMINAL = ("succeeded", "failed", "cancelled")


class ClientError(Exception):
    """An error answer from the API (or no answer), printable as is."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 details: list | None = None):
        super().__init__(message)
        self.status, self.code, self.details = status, code, details or []

    @property
    def exit_code(self) -> int:
        return 2 if self.status is not None and 400 <= self.status < 500 and self.status != 401 else 1


class Client:
    """A thin httpx client for the citi API."""

    def __init__(self, url: str, key: str | None, timeout: float = 60.0):
        import httpx

        if not key:
            raise ClientError("no API key: set CITI_API_KEY or pass --api-key")
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs) -> Any:
        """Send a request; the decoded JSON answer, or :class:`ClientError` with the API's message."""
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the citi API at {self.url} ({exc}); check CITI_API_URL") from exc
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    def upload(self, path: Path) -> dict:
        """Upload a JSONL file for fine-tuning."""
        with open(path, "rb") as f:
            return self.request("POST", "/v1/files", files={"file": (path.name, f, "application/jsonl")},
                                data={"purpose": "fine-tune"})

    def events(self, job_id: str, after: int = 0):
        """Yield the job's events live (SSE) until the job ends; reconnects with Last-Event-ID when cut off."""
        import httpx

        last, failures = after, 0
        while True:
            try:
                headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
                with self.http.stream("GET", f"/jobs/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(60, read=60)) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _error(response)
                    data = None
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            data = json.loads(line[6:])
                        elif line == "" and data is not None:
                            last = data["seq"]
                            failures = 0
                            yield data
                            data = None
                return  # the server ends the stream when the job has ended
            except (httpx.TransportError, httpx.StreamError) as exc:
                failures += 1
                if failures > 5:
                    raise ClientError(f"lost the event stream of {job_id} ({exc})") from exc
                time.sleep(min(2.0 * failures, 10.0))


def _error(response) -> ClientError:
    try:
        err = response.json().get("error", {})
    except ValueError:
        err = {}
    message = err.get("message") or f"HTTP {response.status_code}: {response.text[:200]}"
    return ClientError(message, status=response.status_code, code=err.get("code"), details=err.get("details"))


# -- commands --------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(args.api_url or os.environ.get("CITI_API_URL") or DEFAULT_URL,
                  args.api_key or os.environ.get("CITI_API_KEY"))


def _file_id(client: Client, value: str | None, console) -> str | None:
    """A file id as given, or the id of the local file ``value`` once uploaded."""
    if value is None or value.startswith("file-"):
        return value
    path = Path(value)
    if not path.is_file():
        raise ClientError(f"{value} is neither a file id (file-...) nor a local file", status=400)
    uploaded = client.upload(path)
    console.print(f"uploaded {path} as {uploaded['id']} ({uploaded['n_examples']} examples: "
                  f"{uploaded['n_tool']} tool, {uploaded['n_general']} general)")
    return uploaded["id"]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_submit(args: argparse.Namespace, console) -> int:
    client = _client(args)
    try:
        body: dict[str, Any] = {
            "model": args.model,
            "training_file": _file_id(client, args.training_file, console),
            "method": {"type": args.method, "hyperparameters": {}},
        }
        for name in ("validation_file", "general_file"):
            if getattr(args, name):
                body[name] = _file_id(client, getattr(args, name), console)
        budget = {k: getattr(args, k) for k in ("max_steps", "max_tokens", "max_seconds") if getattr(args, k)}
        if budget:
            body["budget"] = budget
        components = {k: getattr(args, k) for k in ("molora_fraction", "uco_fraction") if getattr(args, k)}
        if components:
            body["components"] = components
        for item in args.hyperparameter or []:
            name, sep, value = item.partition("=")
            if not sep:
                raise ClientError(f"--hyperparameter wants NAME=VALUE, got '{item}'", status=400)
            body["method"]["hyperparameters"][name] = _parse_value(value)
        for name in ("suffix", "seed"):
            if getattr(args, name) is not None:
                body[name] = getattr(args, name)
        headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
        job = client.request("POST", "/jobs", json=body, headers=headers)
        if args.json:
            print(json.dumps(job, indent=1))
        else:
            console.print(f"job {job['id']} {job['status']}")
        if args.watch:
            return _watch(client, job["id"], console, quiet=args.json)
        return 0
    finally:
        client.close()


def cmd_jobs(args: argparse.Namespace, console) -> int:
    client = _client(args)
    try:
        params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
        page = client.request("GET", "/jobs", params=params)
    finally:
        client.close()
    if args.json:
        print(json.dumps(page, indent=1))
        return 0
    from rich.table import Table

    table = Table(title="jobs")
    for column in ("id", "status", "model", "method", "progress", "created"):
        table.add_column(column)
    for job in page["data"]:
        progress = job.get("progress") or {}
        steps = f"{progress.get('step', 0)}/{progress.get('total_steps') or '?'}" if progress else ""
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(job["created_at"]))
        table.add_row(job["id"], job["status"], job["model"], job["method"].get("type", ""), steps, created)
    console.print(table)
    return 0


def cmd_status(args: argparse.Namespace, console) -> int:
    client = _client(args)
    try:
        job = client.request("GET", f"/jobs/{args.job_id}")
    finally:
        client.close()
    if args.json:
        print(json.dumps(job, indent=1))
        return 0
    console.print(f"[bold]{job['id']}[/bold]  {job['status']}" + (f"  (stage {job['stage']})" if job.get("stage") else ""))
    if job.get("queue_position"):
        console.print(f"  position in queue: {job['queue_position']}")
    progress = job.get("progress") or {}
    if progress:
        console.print(f"  step {progress.get('step')}/{progress.get('total_steps')}  loss {progress.get('loss')}")
    if job.get("fine_tuned_model"):
        console.print(f"  fine_tuned_model: {job['fine_tuned_model']}  (citi download {job['id']})")
    if job.get("error"):
        console.print(f"  [red]error {job['error']['code']}[/red]: {job['error']['message']}")
    return 0


def _watch(client: Client, job_id: str, console, quiet: bool = False) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    status = None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
                  disable=quiet) as bar:
        task = bar.add_task(job_id, total=None, info="")
        for event in client.events(job_id):
            data = event.get("data") or {}
            if event["type"] == "status":
                status = data.get("status")
                bar.update(task, description=f"{job_id} {status}")
            elif event["type"] == "progress" and data.get("total_steps"):
                loss = data.get("loss")
                info = f"{data.get('stage')}" + (f" loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
                bar.update(task, total=data["total_steps"], completed=data.get("step", 0), info=info)
            elif event["type"] in ("stage", "message", "checkpoint") and not quiet:
                bar.console.print(f"  {event['message']}")
    job = client.request("GET", f"/jobs/{job_id}")
    status = job["status"]
    if status == "succeeded":
        console.print(f"succeeded: {job['fine_tuned_model']}; download it with `citi download {job_id}`")
        return 0
    if status == "cancelled":
        console.print("cancelled")
        return 130
    error = job.get("error") or {}
    console.print(f"[red]{status}[/red]: {error.get('code')}: {error.get('message')}")
    for detail in (error.get("details") or [])[:20]:
        console.print(f"  line {detail.get('line')}: {detail.get('code')}: {detail.get('message')}")
    return 2 if error.get("code") in USER_ERROR_CODES else 1


def cmd_watch(args: argparse.Namespace, console) -> int:
    client = _client(args)
    try:
        return _watch(client, args.job_id, console)
    finally:
        client.close()


def cmd_download(args: argparse.Namespace, console) -> int:
    client = _client(args)
    target = Path(args.output or f"{args.job_id}.tar.gz")
    try:
        with client.http.stream("GET", f"/jobs/{args.job_id}/adapter") as response:
            if response.status_code >= 400:
                response.read()
                raise _error(response)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            with open(partial, "wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
            os.replace(partial, target)
    finally:
        client.close()
    if args.extract:
        dest = Path(args.extract)
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(target, "r:gz") as tar:
            tar.extractall(dest, filter="data")
        console.print(f"adapter extracted to {dest / args.job_id}")
    else:
        console.print(f"adapter saved to {target}")
    return 0


def _handler(command):
    def run(args: argparse.Namespace) -> int:
        from rich.console import Console

        console = Console(stderr=bool(getattr(args, "json", False)))
        try:
            return command(args, console)
        except ClientError as exc:
            console.print(f"[red]error[/red]: {exc}")
            for detail in exc.details[:50]:
                console.print(f"  line {detail.get('line')}: {detail.get('code')}: {detail.get('message')}")
            return exc.exit_code
    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-url", default=None, help=f"the citi API (default: $CITI_API_URL or {DEFAULT_URL})")
    p.add_argument("--api-key", default=None, help="API key (default: $CITI_API_KEY)")


def register(subparsers) -> None:
    """Add ``submit``, ``jobs``, ``status``, ``watch`` and ``download`` to the ``citi`` parser."""
    p = subparsers.add_parser("submit", help="submit a fine-tuning job to the service",
                              description="Upload the training file (unless a file id is given) and create a job.")
    p.add_argument("training_file", help="a local JSONL file (uploaded first) or an uploaded file id (file-...)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model spec")
    p.add_argument("--validation-file", default=None, help="held-out tool test set: local file or file id")
    p.add_argument("--general-file", default=None, help="general examples to mix in: local file or file id")
    p.add_argument("--method", choices=("citi", "lora", "full"), default="citi")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--molora-fraction", type=float, default=None)
    p.add_argument("--uco-fraction", type=float, default=None)
    p.add_argument("--hyperparameter", "-H", action="append", metavar="NAME=VALUE",
                   help="a method hyperparameter, e.g. -H batch_size=8 (repeatable)")
    p.add_argument("--suffix", default=None, help="added to the fine_tuned_model id")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--idempotency-key", default=None, help="retrying with the same key returns the same job")
    p.add_argument("--watch", action="store_true", help="follow the job until it ends")
    p.add_argument("--json", action="store_true", help="print the job as JSON")
    _common(p)
    p.set_defaults(func=_handler(cmd_submit))

    p = subparsers.add_parser("jobs", help="list your fine-tuning jobs")
    p.add_argument("--status", default=None, help="only jobs in this status")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=_handler(cmd_jobs))

    p = subparsers.add_parser("status", help="show one job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=_handler(cmd_status))

    p = subparsers.add_parser("watch", help="follow a job live with a progress bar until it ends")
    p.add_argument("job_id")
    _common(p)
    p.set_defaults(func=_handler(cmd_watch))

    p = subparsers.add_parser("download", help="download a finished job's adapter (.tar.gz)")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", default=None, help="where to save the archive (default: <job id>.tar.gz)")
    p.add_argument("--extract", default=None, metavar="DIR", help="also extract the archive into DIR")
    _common(p)
    p.set_defaults(func=_handler(cmd_download))


if __name__ == "__main__":  # pragma: no cover - convenience: python -m citi_engine.cli.client
    parser = argparse.ArgumentParser(prog="citi")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
