"""``citi submit | jobs | status | watch | download | cancel | delete | files``: the service client.

Talks to the API at ``CITI_API_URL`` (default ``http://127.0.0.1:8000``) with the key in ``CITI_API_KEY``
(both also given as ``--api-url`` / ``--api-key``). Uses httpx; never imports torch.

    citi submit train.jsonl --model smollm2-135m-instruct --max-steps 200 --watch
    citi jobs --status running
    citi status ftjob-...
    citi watch ftjob-...            # a live progress bar fed by the job's SSE stream
    citi download ftjob-... -o adapter.tar.gz   (or --extract DIR)
    citi cancel ftjob-...
    citi delete ftjob-... --yes [--with-files]  # the job with its adapter, report and events
    citi files list | upload FILE... | delete file-...

Lists (``jobs``, ``files list``) never shorten an id: on a terminal a table whose other columns fold, or
where the terminal is too narrow for that (80 columns for ``jobs``), one block a row; in a pipe each row is
one line of tab-separated fields (the id first), no header.

``submit`` uploads local files first (the API checks a job only against uploaded file ids, and the
estimate route needs one too); when the job is then refused, or the submit is interrupted, it deletes
the files it uploaded, so nothing is left behind. With ``--idempotency-key`` it reuses an identical file
already uploaded, so a retried submit finds the same request and returns the same job.

Exit codes: 0 done (a watched job succeeded), 2 a problem the user can fix (bad file, bad parameters,
a job that failed on its data or budget, a path that cannot be written), 1 anything else, 130
interrupted or the job was cancelled.
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
                 details: list | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.status, self.code, self.details = status, code, details or []
        self._exit_code = exit_code

    @property
    def exit_code(self) -> int:
        """2 for a problem the user can fix (a 4xx answer but 401, or one we say is), else 1."""
        if self._exit_code is not None:
            return self._exit_code
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


def _print_rows(console, title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Rows whose first cell is an id, which is never shortened.

    In a pipe: one line a row, tab-separated, no header. On a terminal: a table whose id column never wraps
    and whose other columns fold; where the terminal is too narrow for that to stay readable, one block a
    row (the id on its own line, then ``name: value`` lines).
    """
    if not console.is_terminal:
        for row in rows:
            console.file.write("\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in row) + "\n")
        console.file.flush()
        return
    id_width = max([len(row[0]) for row in rows] + [len(columns[0])])
    # Each other column at least 8 wide (or its longest cell), 3 characters of border and padding a column.
    others = sum(min(8, max([len(row[i]) for row in rows] + [len(name)])) for i, name in enumerate(columns) if i)
    if console.width < id_width + others + 3 * len(columns) + 1:
        for row in rows:
            console.print(row[0], soft_wrap=True)
            for name, cell in zip(columns[1:], row[1:], strict=True):
                if cell:
                    console.print(f"  {name}: {cell}", soft_wrap=True)
        return
    from rich.table import Table

    table = Table(title=title)
    table.add_column(columns[0], no_wrap=True, min_width=id_width)
    for column in columns[1:]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _uploaded_copy(client: Client, path: Path) -> dict | None:
    """A file this key already uploaded with the same name and the very same bytes, if there is one."""
    data = path.read_bytes()
    page = client.request("GET", "/v1/files", params={"limit": 10000})
    for record in page["data"]:
        if record["filename"] == path.name and record["bytes"] == len(data):
            response = client.http.get(f"/v1/files/{record['id']}/content")
            if response.status_code == 200 and response.content == data:
                return record
    return None


def _file_id(client: Client, value: str | None, console, uploaded: list[str], reuse: bool = False) -> str | None:
    """A file id as given, or the id of the local file ``value`` once uploaded (appended to ``uploaded``)."""
    if value is None or value.startswith("file-"):
        return value
    path = Path(value)
    if not path.is_file():
        raise ClientError(f"{value} is neither a file id (file-...) nor a local file", status=400)
    if reuse:
        existing = _uploaded_copy(client, path)
        if existing is not None:
            console.print(f"{path} is already uploaded as {existing['id']}; using it")
            return existing["id"]
    record = client.upload(path)
    uploaded.append(record["id"])
    console.print(f"uploaded {path} as {record['id']} ({record['n_examples']} examples: "
                  f"{record['n_tool']} tool, {record['n_general']} general)")
    return record["id"]


def _delete_uploads(client: Client, file_ids: list[str], console) -> None:
    """Delete the files this submit uploaded for a job that was not created (a job that uses one keeps it)."""
    for file_id in file_ids:
        try:
            client.request("DELETE", f"/v1/files/{file_id}")
            console.print(f"deleted {file_id}, uploaded for the refused job")
        except ClientError as exc:
            console.print(f"kept {file_id}: {exc}")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _job_body(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON body of ``POST /jobs`` for ``citi submit``'s flags, without the file ids."""
    body: dict[str, Any] = {"model": args.model, "method": {"type": args.method, "hyperparameters": {}}}
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
    return body


def cmd_submit(args: argparse.Namespace, console) -> int:
    body = _job_body(args)  # flags are checked before anything is uploaded
    client = _client(args)
    uploaded: list[str] = []
    reuse = bool(args.idempotency_key)
    try:
        try:
            body["training_file"] = _file_id(client, args.training_file, console, uploaded, reuse)
            for name in ("validation_file", "general_file"):
                if getattr(args, name):
                    body[name] = _file_id(client, getattr(args, name), console, uploaded, reuse)
            headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
            job = client.request("POST", "/jobs", json=body, headers=headers)
        except (ClientError, KeyboardInterrupt) as exc:
            # Refused (or interrupted): what this submit uploaded would be left behind, unused. Without an
            # answer the job may exist; the API refuses to delete a file an unfinished job uses.
            if uploaded and not (isinstance(exc, ClientError) and exc.status is None):
                _delete_uploads(client, uploaded, console)
            raise
        if args.json:
            print(json.dumps(job, indent=1))
        else:
            console.print(f"job {job['id']} {job['status']}")
        if args.watch:
            return _watch(client, job["id"], console, quiet=args.json)
        return 0
    finally:
        client.close()


def _when(timestamp: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp else ""


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
    rows = []
    for job in page["data"]:
        progress = job.get("progress") or {}
        steps = f"{progress.get('step', 0)}/{progress.get('total_steps') or '?'}" if progress else ""
        rows.append((job["id"], job["status"], job["model"], (job.get("method") or {}).get("type", ""), steps,
                     _when(job.get("created_at")), job.get("fine_tuned_model") or ""))
    _print_rows(console, "jobs", ("id", "status", "model", "method", "progress", "created", "fine_tuned_model"), rows)
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


def _writable_target(output: str | None, job_id: str) -> Path:
    """Where the archive goes: ``output`` (inside it when it is a folder), else ``<job id>.tar.gz``."""
    target = Path(output or f"{job_id}.tar.gz")
    if target.is_dir():
        target = target / f"{job_id}.tar.gz"
    return target


def cmd_download(args: argparse.Namespace, console) -> int:
    import httpx
    from rich.filesize import decimal
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

    target = _writable_target(args.output, args.job_id)
    partial = target.with_name(target.name + ".part")
    try:  # before asking for the archive: a path that cannot be written fails at once, in one line
        target.parent.mkdir(parents=True, exist_ok=True)
        out = open(partial, "wb")
    except OSError as exc:
        raise _write_error(target, exc) from exc
    client = _client(args)
    try:
        with out, client.http.stream("GET", f"/jobs/{args.job_id}/adapter") as response:
            if response.status_code >= 400:
                response.read()
                raise _error(response)
            length = response.headers.get("Content-Length")  # the archive is streamed: usually unknown
            total = int(length) if length and length.isdigit() else None
            with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[size]}"),
                          TransferSpeedColumn(), TimeElapsedColumn(), console=console, disable=args.quiet) as bar:
                task = bar.add_task(args.job_id, total=total, size="0 bytes")
                done = 0
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    done += len(chunk)
                    bar.update(task, completed=done, size=decimal(done))
                bar.update(task, total=done, completed=done)  # ends full once the size is known
        os.replace(partial, target)
    except httpx.HTTPError as exc:
        raise ClientError(f"the download of {args.job_id} from {client.url} broke off ({exc}); run it again") from exc
    except OSError as exc:
        raise _write_error(target, exc) from exc
    finally:
        partial.unlink(missing_ok=True)
        client.close()
    if args.extract:
        dest = Path(args.extract)
        try:
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(target, "r:gz") as tar:
                tar.extractall(dest, filter="data")
        except OSError as exc:
            raise _write_error(dest, exc) from exc
        except tarfile.TarError as exc:
            raise ClientError(f"{target} is not a complete adapter archive ({exc}); download it again") from exc
        console.print(f"adapter extracted to {dest / args.job_id}", soft_wrap=True)
    else:
        console.print(f"adapter saved to {target} ({decimal(target.stat().st_size)})", soft_wrap=True)
    return 0


def _write_error(path: Path, exc: OSError) -> ClientError:
    reason = exc.strerror or str(exc)
    in_the_way = [d for d in path.parents if d.exists() and not d.is_dir()]
    if in_the_way:
        reason = f"{in_the_way[-1]} is a file, not a folder"
    return ClientError(f"cannot write {path}: {reason}; choose another path", exit_code=2)


def cmd_cancel(args: argparse.Namespace, console) -> int:
    client = _client(args)
    try:
        job = client.request("POST", f"/jobs/{args.job_id}/cancel")
    finally:
        client.close()
    if args.json:
        print(json.dumps(job, indent=1))
    elif job["status"] == "cancelled":
        console.print(f"job {job['id']} cancelled")
    else:  # a running job stops within one training step
        console.print(f"job {job['id']} {job['status']}: it stops within one training step "
                      f"(citi watch {job['id']} follows it)")
    return 0


def _confirmed(args: argparse.Namespace, what: str) -> bool:
    """``--yes``, or a yes typed at the terminal; never a silent yes in a script."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise ClientError(f"not deleting {what} without --yes (stdin is not a terminal to ask on)", exit_code=2)
    return input(f"delete {what}? this cannot be undone [y/N] ").strip().lower() in ("y", "yes")


def cmd_delete(args: argparse.Namespace, console) -> int:
    client = _client(args)
    try:
        job = client.request("GET", f"/jobs/{args.job_id}")
        if job["status"] not in TERMINAL:  # the API would refuse it too (409 job_not_finished)
            raise ClientError(f"job {job['id']} is {job['status']}; cancel it (citi cancel {job['id']}) and delete "
                              "it once it has stopped", exit_code=2)
        files = [job[name] for name in ("training_file", "validation_file", "general_file")
                 if args.with_files and job.get(name)]
        what = f"job {job['id']} with its adapter, report and events" + (f" and {', '.join(files)}" if files else "")
        if not _confirmed(args, what):
            console.print("nothing deleted")
            return 1
        client.request("DELETE", f"/jobs/{args.job_id}")
        console.print(f"deleted job {job['id']}" + (f" ({job['fine_tuned_model']})" if job.get("fine_tuned_model")
                                                    else ""))
        code = 0
        for file_id in files:
            try:
                client.request("DELETE", f"/v1/files/{file_id}")
                console.print(f"deleted {file_id}")
            except ClientError as exc:  # in use by another unfinished job, or already gone
                console.print(f"kept {file_id}: {exc}")
                code = exc.exit_code
        return code
    finally:
        client.close()


def cmd_files_list(args: argparse.Namespace, console) -> int:
    client = _client(args)
    try:
        page = client.request("GET", "/v1/files", params={"limit": args.limit})
    finally:
        client.close()
    if args.json:
        print(json.dumps(page, indent=1))
        return 0
    # A job's result files (the adapter archive, the report) have no format and no counts: their purpose instead
    rows = [(f["id"], f["filename"], f.get("format") or f.get("purpose") or "-",
             *((str(f["n_examples"]), f"{f['n_tool']}/{f['n_general']}") if f.get("n_examples") is not None
               else ("-", "-")),
             str(f["bytes"]), _when(f.get("created_at"))) for f in page["data"]]
    _print_rows(console, "files", ("id", "filename", "format", "examples", "tool/general", "bytes", "created"), rows)
    return 0


def cmd_files_upload(args: argparse.Namespace, console) -> int:
    client = _client(args)
    try:
        records = []
        for name in args.paths:
            path = Path(name)
            if not path.is_file():
                raise ClientError(f"no file at {path}", exit_code=2)
            record = client.upload(path)
            records.append(record)
            if not args.json:
                console.print(f"{record['id']}\t{path}: {record['n_examples']} examples "
                              f"({record['n_tool']} tool, {record['n_general']} general)")
    finally:
        client.close()
    if args.json:
        print(json.dumps(records if len(records) != 1 else records[0], indent=1))
    return 0


def cmd_files_delete(args: argparse.Namespace, console) -> int:
    client = _client(args)
    code = 0
    try:
        for file_id in args.file_ids:
            try:
                client.request("DELETE", f"/v1/files/{file_id}")
                console.print(f"deleted {file_id}")
            except ClientError as exc:  # go on with the others; the exit code says one failed
                console.print(f"[red]error[/red]: {file_id}: {exc}")
                code = max(code, exc.exit_code)
    finally:
        client.close()
    return code


def _handler(command):
    def run(args: argparse.Namespace) -> int:
        from rich.console import Console

        # No highlighting: rich would colour parts of ids and paths (an "a:c" in an id as an IPv6 address).
        console = Console(stderr=bool(getattr(args, "json", False)), highlight=False)
        try:
            return command(args, console)
        except ClientError as exc:
            console.print(f"[red]error[/red]: {exc}", soft_wrap=True)
            for detail in exc.details[:50]:
                console.print(f"  line {detail.get('line')}: {detail.get('code')}: {detail.get('message')}",
                              soft_wrap=True)
            return exc.exit_code
        except OSError as exc:  # a local file that cannot be read or written: the user can fix it
            where = f"{exc.filename}: " if exc.filename else ""
            console.print(f"[red]error[/red]: {where}{exc.strerror or exc}", soft_wrap=True)
            return 2
    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-url", default=None, help=f"the citi API (default: $CITI_API_URL or {DEFAULT_URL})")
    p.add_argument("--api-key", default=None, help="API key (default: $CITI_API_KEY)")


def register(subparsers) -> None:
    """Add the service commands (submit, jobs, status, watch, download, cancel, delete, files) to ``citi``."""
    p = subparsers.add_parser("submit", help="submit a fine-tuning job to the service",
                              description="Upload the training file (unless a file id is given) and create a job. "
                              "Files uploaded for a job the API refuses are deleted again.")
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
    p.add_argument("--idempotency-key", default=None,
                   help="retrying with the same key returns the same job (a local file already uploaded with the "
                   "same name and bytes is reused, not uploaded again)")
    p.add_argument("--watch", action="store_true", help="follow the job until it ends")
    p.add_argument("--json", action="store_true", help="print the job as JSON")
    _common(p)
    p.set_defaults(func=_handler(cmd_submit))

    p = subparsers.add_parser("jobs", help="list your fine-tuning jobs",
                              description="List your jobs, newest first. Ids are never shortened. On a terminal, a "
                              "table whose other columns fold, or one block a job where the terminal is too narrow "
                              "for that; in a pipe, one tab-separated line a job, no header: id, status, model, "
                              "method, progress, created, fine_tuned_model.")
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

    p = subparsers.add_parser("download", help="download a finished job's adapter (.tar.gz) with a progress bar")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", default=None,
                   help="where to save the archive: a file, or a folder to save <job id>.tar.gz in "
                   "(default: <job id>.tar.gz here)")
    p.add_argument("--extract", default=None, metavar="DIR", help="also extract the archive into DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _common(p)
    p.set_defaults(func=_handler(cmd_download))

    p = subparsers.add_parser("cancel", help="cancel a job (a queued one at once, a running one within a step)")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print the job as JSON")
    _common(p)
    p.set_defaults(func=_handler(cmd_cancel))

    p = subparsers.add_parser("delete", help="delete a finished job: its fine-tuned model (adapter), report, events",
                              description="Delete a finished (succeeded, failed or cancelled) job with its adapter "
                              "(the fine-tuned model), report and events; cancel an unfinished one first. Asks "
                              "first on a terminal; elsewhere it needs --yes.")
    p.add_argument("job_id")
    p.add_argument("--with-files", action="store_true",
                   help="also delete the job's training, validation and general files (kept when another "
                   "unfinished job uses them)")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")
    _common(p)
    p.set_defaults(func=_handler(cmd_delete))

    p = subparsers.add_parser("files", help="list, upload or delete your uploaded files (the Files API)")
    files = p.add_subparsers(dest="files_command", metavar="ACTION", required=True)
    q = files.add_parser("list", help="list your files, newest first",
                         description="Ids are never shortened. On a terminal, a table (one block a file where it "
                         "is too narrow); in a pipe, one tab-separated line a file, no header: id, filename, format, "
                         "examples, tool/general, bytes, created.")
    q.add_argument("--limit", type=int, default=100)
    q.add_argument("--json", action="store_true")
    _common(q)
    q.set_defaults(func=_handler(cmd_files_list))
    q = files.add_parser("upload", help="upload JSONL files (checked by the API; a bad one is listed line by line)")
    q.add_argument("paths", nargs="+", metavar="FILE")
    q.add_argument("--json", action="store_true", help="print the file object(s) as JSON")
    _common(q)
    q.set_defaults(func=_handler(cmd_files_upload))
    q = files.add_parser("delete", help="delete files (refused while an unfinished job uses one)")
    q.add_argument("file_ids", nargs="+", metavar="FILE_ID")
    _common(q)
    q.set_defaults(func=_handler(cmd_files_delete))


if __name__ == "__main__":  # pragma: no cover - convenience: python -m citi_engine.cli.client
    parser = argparse.ArgumentParser(prog="citi")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
