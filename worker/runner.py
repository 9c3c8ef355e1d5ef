"""The job's child process: build the engine config from the job record, run ``finetune``, store the adapter.

It runs in the job's working directory (see :mod:`citi_service.keys`) and gives the engine paths
relative to it, so a job resumed by another worker (another working root, with S3 storage) builds the
very same config and the engine accepts its checkpoints. Engine events go to the store as they happen;
``should_cancel`` answers the cancel flag and, every step, whether this process still holds the job's
lease and its worker is alive; if not, the engine stops and this process exits without touching the job.

Several GPUs (``CITI_GPUS_PER_JOB``, default: every GPU the worker sees): the child fetches the job's
files, then starts one training process per GPU with ``torch.distributed.run`` (torchrun's
``--standalone`` launcher, in-process) running ``python -m worker.runner``. Each of them dies with
the child (PR_SET_PDEATHSIG), which dies with the worker. Rank 0 does everything a single process
does (events, checkpoint records, the outcome); the other ranks train and watch the cancel flag and
the lease, and record an outcome only when they fail first. With one GPU (or on CPU) nothing of this
runs: the child trains in itself, as before.

Pause: once the job's pause flag is set, ``should_cancel`` stops the engine at the first checkpoint written
after it (it looks at the checkpoints directory before every step), and the job is recorded ``paused``
with its checkpoints left in place; a resumed job is claimed again and the engine resumes from them.

Continuing a fine-tuned model (a job with ``parent_job``): the child builds the job's starting model first,
the parent's adapter merged into its base as a plain model (:func:`citi_engine.export.export_model`, exact for
lora and full adapters; the API accepts no other), and trains on it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import sys
import tarfile
import threading
import time
import traceback
from pathlib import Path

from citi_service.keys import (
    adapter_prefix,
    checkpoints_prefix,
    file_key,
    out_dir,
    result_file_id,
    results_archive_key,
    work_dir,
)
from citi_service.records import ACTIVE, RESULT_FILE_PURPOSE, fine_tuned_model_id, short_job_id, status_event
from citi_service.settings import Settings, get_settings
from citi_service.storage import Storage, make_storage
from citi_service.store import Store
from worker.artifacts import remove_partial_files, remove_training_state

log = logging.getLogger("citi.runner")

EXIT_LEASE_LOST = 3
# A training process of a data-parallel job that stopped with an error (its outcome is recorded): non-zero,
# so torchrun stops the other processes at once instead of leaving them waiting for it in a collective.
EXIT_RANK_FAILED = 4
# A training process whose collective failed because another process of the job died (it records nothing: the
# launcher decides), and the launcher's code for "one of the job's training processes was killed": the worker
# queues the job again to resume from its last checkpoint, as when a whole worker is lost.
EXIT_PEER_LOST = 5
EXIT_PROCESS_LOST = 6
# Worker setting: how many GPUs (data-parallel training processes) one job uses.
GPUS_PER_JOB_ENV = "CITI_GPUS_PER_JOB"
# What the child passes to the training processes it starts (the token stays out of their command line).
JOB_ENV, TOKEN_ENV, PARENT_ENV = "CITI_JOB_ID", "CITI_JOB_TOKEN", "CITI_JOB_PARENT_PID"
# A job's phase is what the engine reports in an event's `stage` field, and what the job record (and the
# API's JSON) keeps in its `stage` field: `validating`, `loading`, `importance`, `replay`, a training stage,
# `eval`, `saving`, then `done`. Phases during which the job is still `validating_files` (data checks,
# tokenizer, model load):
VALIDATING_PHASES = ("validating", "loading")
# The training stages: their progress events carry the loss that checkpoint records show.
TRAINING_STAGES = ("router_pretraining", "molora", "uco", "train")
PR_SET_PDEATHSIG = 1
CANCEL_CHECK_S = 0.05
# A training process waits this long for Redis to come back (a restart) instead of failing its job.
REDIS_OUTAGE_S = 120.0
# Where a continuing job's starting model is built, relative to its working directory.
START_MODEL = Path("inputs") / "start_model"


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when the worker dies (kill -9 included), so a job never runs orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: should_cancel's parent check still stops the job within a step
    if os.getppid() != parent_pid:
        os._exit(EXIT_LEASE_LOST)


def run_job_process(job_id: str, token: str, parent_pid: int) -> None:
    """Entry point of the spawned child process."""
    _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {job_id}: %(message)s")
    settings = get_settings()
    code = JobRunner(job_id, token, parent_pid, settings, Store(settings.redis_url, outage_s=REDIS_OUTAGE_S),
                     make_storage(settings)).run()
    sys.stdout.flush()
    os._exit(code)


def run_rank_process() -> None:
    """Entry point of one training process of a data-parallel job (``python -m worker.runner`` under torchrun)."""
    job_id, token, parent_pid = os.environ[JOB_ENV], os.environ[TOKEN_ENV], int(os.environ[PARENT_ENV])
    rank = int(os.environ.get("RANK", "0"))
    _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {job_id} rank {rank}: %(message)s")
    settings = get_settings()
    code = JobRunner(job_id, token, parent_pid, settings, Store(settings.redis_url, outage_s=REDIS_OUTAGE_S),
                     make_storage(settings), rank=rank).run()
    sys.stdout.flush()
    os._exit(code)


def peer_lost(exc: BaseException) -> bool:
    """True when ``exc`` is a collective that failed because another process of the job went away (gloo's
    connection reset or closed, an NCCL communicator aborted), not an error of this process's own. The launcher
    still decides: the job is resumed only when one of its processes was in fact killed."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistNetworkError", ()) or ()):
        return True
    text = str(exc)
    markers = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
               "ncclRemoteError", "remote process exited")
    return isinstance(exc, RuntimeError) and any(m in text for m in markers)


def gpus_per_job(device: str | None) -> int:
    """Training processes one job uses: ``CITI_GPUS_PER_JOB``, else every visible GPU.

    One when ``CITI_DEVICE`` is ``cpu`` or names one GPU (``cuda:N``), unless ``CITI_GPUS_PER_JOB``
    asks for more: then CPU processes train together over gloo (what the tests do), and on GPUs
    each process takes GPU ``LOCAL_RANK`` of the visible ones. Never more processes than GPUs.
    """
    raw = os.environ.get(GPUS_PER_JOB_ENV, "").strip()
    wanted = None
    if raw:
        try:
            wanted = int(raw)
        except ValueError:
            wanted = 0
        if wanted < 1:
            raise ValueError(f"{GPUS_PER_JOB_ENV}={raw!r} is not a whole number >= 1: set it to the number of GPUs "
                             "one job may use, or leave it empty for all the worker sees")
        if wanted == 1:
            return 1
    device = (device or "").strip().lower()
    if device == "cpu" or device.startswith("cuda:"):
        return wanted or 1
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        return wanted or 1  # no GPU: CPU processes when asked for, else one
    if wanted and wanted > visible:
        log.warning("%s=%d but the worker sees %d GPU(s): using %d", GPUS_PER_JOB_ENV, wanted, visible, visible)
    return min(wanted or visible, visible)


def torchrun_args(nproc: int) -> list[str]:
    """Arguments of ``torchrun`` (``torch.distributed.run``) that start one job's ``nproc`` training processes.

    ``--standalone``: a rendezvous on this host on a free port (several jobs on one host never meet).
    No restarts: a failed process fails the job (the lease and the checkpoints resume it elsewhere).
    """
    return ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--module", "worker.runner"]


class JobRunner:
    """Runs one job in this process and records its outcome in the store."""

    def __init__(self, job_id: str, token: str, parent_pid: int, settings: Settings, store: Store, storage: Storage,
                 rank: int | None = None):
        self.job_id, self.token, self.parent_pid = job_id, token, parent_pid
        self.settings, self.store, self.storage = settings, store, storage
        self.rank = rank  # None: the job's only process (or the one that starts the training processes)
        self.lost = False
        self.phase: str | None = None
        self.running = False
        self._checked_at = float("-inf")
        self._cancel = False
        self._pause_after: float | None = None  # newest checkpoint's time when a pause was asked
        self.pausing = False  # the engine was stopped for a pause, at a checkpoint
        self.work = work_dir(settings, job_id)
        self.out_dir = out_dir(job_id)  # relative to self.work, the process's working directory

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> int:
        """Run the job; returns the process exit code (0 when the outcome is recorded).

        When the job may use several GPUs, this process fetches its files and starts the training
        processes (:meth:`_launch`); each of them runs this method again with its ``rank``.
        """
        from citi_engine.errors import Cancelled, CitiError

        if self.rank is not None and self.rank > 0:
            return self._follow()
        job = self.store.get_job(self.job_id)
        if job is None:
            return 0
        watcher = None
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            os.chdir(self.work)
            cfg = self._config(job)
            nproc = self._processes(cfg)
            if nproc > 1:
                return self._launch(nproc)
            watcher = CheckpointWatcher(self)
            watcher.start()
            from citi_engine.train import finetune

            result = finetune(cfg, on_event=self.on_event, should_cancel=self.should_cancel)
            watcher.stop()
            watcher = None
            if self.lost:
                return EXIT_LEASE_LOST
            self._succeed(job, result)
        except Cancelled:
            if self.lost:
                return EXIT_LEASE_LOST
            if self.pausing and not self._cancel:
                if watcher is not None:
                    watcher.stop()  # every checkpoint recorded (and with S3 copied) before the job is paused
                    watcher = None
                self._pause()
            else:
                self._end("cancelled", "cancelled", None)
        except CitiError as exc:  # bad data (every problem in details), budget, model: the user can act on it
            if self.lost:
                return EXIT_LEASE_LOST
            self._end("failed", f"the job failed: {exc.message}", exc.to_dict(), level="error")
            return self._failed_exit_code()
        except Exception as exc:
            if self.lost:
                return EXIT_LEASE_LOST
            if self.rank is not None and peer_lost(exc):
                log.error("job %s: rank %s lost another training process: %s", self.job_id, self.rank, exc)
                return EXIT_PEER_LOST
            log.error("job %s failed:\n%s", self.job_id, traceback.format_exc())
            error = {"code": "training_error", "param": None,
                     "message": f"training failed: {type(exc).__name__}: {exc}"[:2000]}
            self._end("failed", error["message"], error, level="error")
            return self._failed_exit_code()
        finally:
            if watcher is not None:
                watcher.stop()
        return EXIT_LEASE_LOST if self.lost else 0

    def _failed_exit_code(self) -> int:
        # A training process of several must not exit 0 after a failure: torchrun would wait for the
        # others, which may be waiting for it. Its outcome is recorded either way.
        return EXIT_RANK_FAILED if self.rank is not None else 0

    # -- several GPUs -----------------------------------------------------------------------------

    def _processes(self, cfg) -> int:
        """How many processes train this job: one inside a training process, else :func:`gpus_per_job`,
        at most one per example of a step (each process trains a share of every step)."""
        if self.rank is not None:
            return 1
        n = gpus_per_job(self.settings.device)
        per_step = cfg.hyperparameters.batch_size * cfg.hyperparameters.gradient_accumulation_steps
        if n > per_step:
            log.info("job %s: %d examples a step, so %d processes instead of %d", self.job_id, per_step, per_step, n)
            n = per_step
        return n

    def _launch(self, nproc: int) -> int:
        """Train on ``nproc`` processes started by torchrun's launcher; return this process's exit code.

        The training processes record the outcome. Exit codes keep the meaning they have for a single
        process: 0 outcome recorded, EXIT_LEASE_LOST, or death by the signal that killed the job (a
        stop of the worker: it is queued again; SIGKILL: most often out of memory).
        """
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args
        from torch.distributed.run import run as torchrun

        os.environ.update({JOB_ENV: self.job_id, TOKEN_ENV: self.token, PARENT_ENV: str(os.getpid())})
        # The processes start in the job's working directory: they find this package through PYTHONPATH.
        root = str(Path(__file__).resolve().parents[1])
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        import torch

        on_gpus = torch.cuda.is_available() and (self.settings.device or "cuda").startswith("cuda")
        what = f"{nproc} GPUs (data-parallel)" if on_gpus else f"{nproc} data-parallel processes"
        log.info("job %s: training on %s", self.job_id, what)
        self.store.add_event(self.job_id, "message", f"training on {what}", {"processes": nproc})
        try:
            torchrun(parse_args(torchrun_args(nproc)))
        except SignalException as exc:
            # The worker is being stopped: torchrun stopped the processes; end as a stopped single process does.
            signal.signal(exc.sigval, signal.SIG_DFL)
            os.kill(os.getpid(), exc.sigval)
            time.sleep(5)
            return 1
        except ChildFailedError as exc:
            return self._after_failure(exc)
        return 0

    def _after_failure(self, exc) -> int:
        """Exit code of the launching process when a training process ended with an error."""
        codes = [f.exitcode for f in exc.failures.values()]
        if EXIT_LEASE_LOST in codes or not self.store.runner_check(self.job_id, self.token)[1]:
            return EXIT_LEASE_LOST
        job = self.store.get_job(self.job_id)
        if job is None or job.get("status") not in ACTIVE:
            return 0  # a training process recorded the outcome
        rank, first = exc.get_first_failure()
        killed = {r: -f.exitcode for r, f in exc.failures.items() if f.exitcode < 0 and -f.exitcode != signal.SIGTERM}
        if killed:
            # One process was killed from outside (kill -9, the kernel's OOM killer); the others stopped on the
            # broken collective or were stopped by torchrun. Nothing is wrong with the job: resume it.
            log.error("job %s: training process(es) %s killed (%s); queueing the job again", self.job_id,
                      sorted(killed), ", ".join(sorted({signal.Signals(v).name for v in killed.values()})))
            return EXIT_PROCESS_LOST
        log.error("job %s: training process %s ended with %s and recorded no outcome", self.job_id, rank, first.exitcode)
        if first.exitcode < 0:  # stopped: die the same way, so the worker reports it as it does for one process
            signal.signal(-first.exitcode, signal.SIG_DFL)
            os.kill(os.getpid(), -first.exitcode)
            time.sleep(5)
        return 1

    def _follow(self) -> int:
        """A training process other than rank 0: train its share; no events, checkpoints or adapter."""
        from citi_engine.errors import Cancelled, CitiError
        from citi_engine.train import finetune

        job = self.store.get_job(self.job_id)
        if job is None:
            return 0
        try:
            os.chdir(self.work)
            finetune(self._config(job), on_event=None, should_cancel=self.should_cancel)
        except Cancelled:
            pass
        except CitiError:
            pass  # the user's error (data, budget, model): rank 0 meets it too and records it
        except Exception as exc:
            if self.lost:
                return EXIT_LEASE_LOST
            if peer_lost(exc):
                log.error("job %s: rank %s lost another training process: %s", self.job_id, self.rank, exc)
                return EXIT_PEER_LOST
            log.error("job %s failed on rank %s:\n%s", self.job_id, self.rank, traceback.format_exc())
            error = {"code": "training_error", "param": None,
                     "message": f"training failed (process {self.rank}): {type(exc).__name__}: {exc}"[:2000]}
            self._end("failed", error["message"], error, level="error", first_only=True)  # rank 0 may have
            return EXIT_RANK_FAILED
        return EXIT_LEASE_LOST if self.lost else 0

    def _config(self, job: dict):
        """The engine config: the record's validated settings plus this host's paths (relative to the work dir)."""
        from citi_engine.training.config import FinetuneConfig

        inputs = Path("inputs")
        paths = {}
        for field in ("training_file", "validation_file", "general_file"):
            file_id = job.get(field)
            if file_id:
                local = inputs / f"{field}.jsonl"
                if not local.is_file():  # a resumed job (and a training process started here) already has them
                    self.storage.get_file(file_key(file_id), local)
                paths[field] = str(local)
        if self.rank is None and self.settings.storage != "local" and not (self.out_dir / "checkpoints").is_dir():
            n = self.storage.download_dir(checkpoints_prefix(self.job_id), self.out_dir / "checkpoints")
            if n:
                log.info("job %s: fetched %d checkpoint files from storage", self.job_id, n)
        engine, model_dirs = dict(job["engine"]), self.settings.model_dirs_list
        if job.get("parent_job"):
            if self.rank is None and not (START_MODEL / "config.json").is_file():
                self._build_start_model(job)
            engine["model"] = str(START_MODEL)
            model_dirs = [*model_dirs, str(START_MODEL.resolve())]
        return FinetuneConfig(**engine, **paths, out_dir=str(self.out_dir), model_dirs=model_dirs,
                              device=self.settings.device)

    def _build_start_model(self, job: dict) -> None:
        """The model a continuing job starts from: its parent's adapter merged into the base, as a plain model."""
        from citi_engine.errors import ModelSpecError
        from citi_engine.export import export_model

        parent, adapter = job["parent_job"], Path("inputs") / "parent_adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        if not self.storage.download_dir(adapter_prefix(parent), adapter):
            raise ModelSpecError("model_not_found", f"the fine-tuned model {job.get('parent_model')} this job "
                                 "continues from was deleted; create the job on a model that exists")
        self.store.add_event(self.job_id, "message", f"building the starting model: {job.get('parent_model')} "
                             "merged into its base", {"stage": "loading"})
        tmp = START_MODEL.with_name(START_MODEL.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        export_model(adapter, tmp, base=job["engine"]["model"], device=self.settings.device or "cpu")
        os.replace(tmp, START_MODEL)
        shutil.rmtree(adapter, ignore_errors=True)

    # -- callbacks from the engine ----------------------------------------------------------------

    def should_cancel(self) -> bool:
        """True to stop the engine: a cancel request, a lost lease, or a dead worker.

        The engine asks before every step, and during generation before every token; Redis is asked at
        most every CANCEL_CHECK_S, far less than one training step.
        """
        if os.getppid() != self.parent_pid:
            self.lost = True
            return True
        now = time.monotonic()
        if now - self._checked_at >= CANCEL_CHECK_S:
            self._checked_at = now
            self._cancel, owned, pause = self.store.runner_state(self.job_id, self.token)
            if not owned:
                self.lost = True
            if pause and self._pause_after is None:
                self._pause_after = self._newest_checkpoint()
        if self._pause_after is not None and not self.pausing and self._newest_checkpoint() > self._pause_after:
            self.pausing = True  # a checkpoint was written since the pause was asked: stop here
        return self._cancel or self.lost or self.pausing

    def _newest_checkpoint(self) -> float:
        """When the newest complete checkpoint was written (0 when there is none)."""
        root, newest = self.work / self.out_dir / "checkpoints", 0.0
        if root.is_dir():
            for meta in root.glob("*/meta.json"):
                if not meta.parent.name.startswith("."):
                    try:
                        newest = max(newest, float(json.loads(meta.read_text()).get("created", 0.0)))
                    except (OSError, ValueError):
                        continue  # being replaced right now
        return newest

    def on_event(self, event: dict) -> None:
        """Store an engine event and keep the job record's phase, status and progress current."""
        if self.lost:
            return
        kind, phase = event.get("type", "message"), event.get("stage")
        message = event.get("message") or _describe(event)
        self.store.add_event(self.job_id, kind, message, event)
        updates: dict = {}
        if phase and phase != self.phase:
            self.phase = phase
            updates["stage"] = phase
            if phase not in VALIDATING_PHASES and not self.running:
                self.running = True
                self.store.transition(self.job_id, "running", from_=["validating_files"], token=self.token,
                                      event=status_event("running", "training started"))
        if kind == "progress":
            progress = {k: event.get(k) for k in ("step", "total_steps", "loss", "routing_loss", "lr",
                                                 "tokens_per_s", "eta_s")}
            progress["stage"] = phase
            updates["progress"] = progress
            if phase in TRAINING_STAGES and event.get("loss") is not None and event.get("eta_s") is not None:
                updates["estimated_finish"] = int(time.time() + float(event["eta_s"]))
        if updates:
            self.store.update_job(self.job_id, **updates)

    # -- outcomes ---------------------------------------------------------------------------------

    def _succeed(self, job: dict, result) -> None:
        out = self.out_dir
        if job.get("parent_job"):
            _name_base(out, job)
        try:
            keys = self.storage.upload_dir(out, adapter_prefix(self.job_id), exclude=("checkpoints",))
            archive = self._store_archive(out)
        except OSError as exc:
            # Disk full or not writable: the training is done but its adapter cannot be kept, so the job
            # fails (and what was written of the adapter is removed, so nothing partial is ever served).
            reason = exc.strerror or str(exc)
            error = {"code": "storage_error", "param": None,
                     "message": f"training finished but the adapter could not be stored: {reason}; the operator "
                                "must free space in (or fix the permissions of) the artifact storage, then the job "
                                "can be submitted again"}
            self._end("failed", error["message"], error, level="error")
            return
        adapter_files = [p for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(out).parts]
        # The archive is stored beside the adapter: both count in the tenant's usage, and go, with the job.
        size = sum(p.stat().st_size for p in adapter_files) + archive.stat().st_size
        model_id = fine_tuned_model_id(job["model"], job.get("suffix"), self.job_id)
        report = None
        if result.report_path and Path(result.report_path).is_file():
            report = _report_summary(Path(result.report_path))
        results = self._result_files(job, archive, out / "report.json")
        archive.unlink()
        fields = {
            "fine_tuned_model": model_id,
            "trained_tokens": int(result.trained_tokens),
            "selected_components": result.selected_components,
            "result_files": [r["id"] for r in results],
            "adapter_files": sorted(k[len(adapter_prefix(self.job_id)):] for k in keys),
            "adapter_bytes": size,
            "has_report": report is not None,
            "report": report,
            "estimated_finish": None,
            "stage": "done",
        }
        event = status_event("succeeded", f"succeeded: {model_id}", fine_tuned_model=model_id,
                             trained_tokens=int(result.trained_tokens))
        outcome, _ = self.store.transition(self.job_id, "succeeded", from_=["validating_files", "running"],
                                           token=self.token, event=event, **fields)
        if outcome == "lease_lost":
            self.lost = True
            return
        if outcome != "ok":
            # Cancelled at the very end: the cancel wins, and the adapter goes.
            self._end("cancelled", "cancelled", None)
            return
        self.store.add_usage(job["tenant"], size)
        self.store.add_result_files(results)
        os.chdir("/")
        remove_training_state(self.settings, self.storage, self.job_id)

    def _store_archive(self, out: Path) -> Path:
        """Write the adapter directory as one ``.tar.gz`` (what ``GET /jobs/{id}/adapter`` streams: top directory
        named like the job, no checkpoints) and store it as the job's result file; returns the local archive.

        Storage has no links, and an archive is no object of the adapter directory, so it is stored once, here,
        instead of being built again for every download through the Files API.
        """
        archive = Path(f"{self.job_id}.tar.gz")
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(out.rglob("*")):
                rel = path.relative_to(out)
                if path.is_file() and not path.is_symlink() and rel.parts[0] != "checkpoints":
                    tar.add(path, arcname=f"{self.job_id}/{rel.as_posix()}")
        self.storage.put_file(results_archive_key(self.job_id), archive)
        return archive

    def _result_files(self, job: dict, archive: Path, report: Path) -> list[dict]:
        """The job's result files as file records (OpenAI's ``result_files``): the archive, and the report."""
        now = int(time.time())
        common = {"tenant": job["tenant"], "created_at": now, "purpose": RESULT_FILE_PURPOSE, "status": "processed",
                  "format": None, "job_id": self.job_id}
        out = [{**common, "id": result_file_id(self.job_id, "adapter"), "bytes": archive.stat().st_size,
                "filename": archive.name}]
        if report.is_file():
            out.append({**common, "id": result_file_id(self.job_id, "report"), "bytes": report.stat().st_size,
                        "filename": "report.json"})
        return out

    def _pause(self) -> None:
        """Record the job paused at the checkpoint it stopped at; leave its checkpoints (and working directory)."""
        from citi_engine.training.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(self.work / self.out_dir / "checkpoints")
        name, step = (ckpt.path.name, int(ckpt.meta.get("global_step", 0))) if ckpt else (None, 0)
        message = (f"paused at checkpoint {name} (step {step}); resume it with POST /v1/fine_tuning/jobs/"
                   f"{self.job_id}/resume")
        outcome, previous = self.store.pause(self.job_id, self.token, message, checkpoint=name, step=step)
        if outcome == "lease_lost":
            self.lost = True
        elif outcome == "refused" and previous == "cancelling":
            self._end("cancelled", "cancelled", None)  # a cancel came in while it was pausing: the cancel wins

    def _end(self, status: str, message: str, error: dict | None, level: str = "info",
             first_only: bool = False) -> None:
        """Record how the job ended and remove its partial files (``first_only``: only when this call
        recorded it, for a training process that may not be the first to see the job end)."""
        log.warning("job %s %s: %s", self.job_id, status, json.dumps(error) if error else message)
        fields = {"error": error, "estimated_finish": None} if error else {"estimated_finish": None}
        outcome, _ = self.store.transition(self.job_id, status, from_=ACTIVE, token=self.token,
                                           event=status_event(status, message, error=error, level=level), **fields)
        if outcome == "lease_lost":
            self.lost = True
            return
        if first_only and outcome != "ok":
            return
        os.chdir("/")
        remove_partial_files(self.settings, self.storage, self.job_id)


class CheckpointWatcher(threading.Thread):
    """Notice checkpoints as the engine writes them: record each in the store (and, with S3 storage, copy
    it to the bucket so another host can resume from it)."""

    def __init__(self, runner: JobRunner, interval_s: float = 0.25):
        super().__init__(name="checkpoint-watcher", daemon=True)
        self.runner, self.interval_s = runner, interval_s
        self.root = runner.work / runner.out_dir / "checkpoints"
        self.seen: dict[str, float] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self._scan_logged()

    def stop(self) -> None:
        """Stop watching, after one last scan: checkpoints written since the previous scan are recorded too."""
        if not self._stop_event.is_set():
            self._stop_event.set()
            self.join(timeout=30)
            self._scan_logged()

    def _scan_logged(self) -> None:
        try:
            self.scan()
        except Exception:
            log.exception("checkpoint scan failed")

    def scan(self) -> None:
        """Handle checkpoints that appeared (or were rewritten) since the last scan."""
        if not self.root.is_dir():
            return
        current, changed = {}, False
        for path in self.root.iterdir():
            meta_file = path / "meta.json"
            if path.name.startswith(".") or not meta_file.is_file():
                continue
            try:
                meta = json.loads(meta_file.read_text())
            except (OSError, ValueError):
                continue  # being replaced right now
            current[path.name] = meta.get("created", 0.0)
            if self.seen.get(path.name) == current[path.name]:
                continue
            self.seen[path.name] = current[path.name]
            self._record(path, meta)
            changed = True
        if changed and self.runner.settings.storage != "local":
            prefix = checkpoints_prefix(self.runner.job_id)
            for name in {o.key[len(prefix):].split("/")[0] for o in self.runner.storage.list(prefix)} - set(current):
                self.runner.storage.delete_prefix(prefix + name)  # pruned by the engine

    def _record(self, path: Path, meta: dict) -> None:
        runner = self.runner
        if runner.lost:
            return
        if runner.settings.storage != "local" and not self._upload(path):
            return
        plan = meta.get("plan") or {}
        names = plan.get("names") or []
        si = int(meta.get("stage_index", 0))
        step = int(meta.get("global_step", 0))
        record = {
            "object": "fine_tuning.job.checkpoint",
            "id": f"ftckpt-{short_job_id(runner.job_id)}-{path.name}",
            "name": path.name,
            "created_at": int(meta.get("created", time.time())),
            "fine_tuning_job_id": runner.job_id,
            "step_number": step,
            "stage": names[si] if si < len(names) else "done",
            "kind": meta.get("kind"),
            # The losses of the step the checkpoint holds (its meta), not of the step training has reached since.
            "metrics": {"step": step, "loss": meta.get("loss"), "routing_loss": meta.get("routing_loss"),
                        "train_loss": meta.get("loss"), "trained_tokens": meta.get("trained_tokens")},
        }
        runner.store.add_checkpoint(runner.job_id, record)
        if meta.get("selected_components") and not runner.lost:
            runner.store.update_job(runner.job_id, selected_components=meta["selected_components"])
        runner.store.add_event(runner.job_id, "checkpoint", f"checkpoint {path.name} saved at step {step}",
                               {"checkpoint": record["id"], "step": step, "stage": record["stage"]})

    def _upload(self, path: Path) -> bool:
        """Copy one checkpoint to storage, meta.json last so a partial copy is never taken for a checkpoint."""
        storage, prefix = self.runner.storage, checkpoints_prefix(self.runner.job_id) + path.name + "/"
        try:
            files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.name == "meta.json")
            for file in files:
                storage.put_file(prefix + file.relative_to(path).as_posix(), file)
            return True
        except FileNotFoundError:  # the engine pruned it meanwhile
            storage.delete_prefix(prefix)
            return False


def _describe(event: dict) -> str:
    if event.get("type") == "progress":
        loss = event.get("loss")
        tail = f", loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
        return f"{event.get('stage')}: step {event.get('step')}/{event.get('total_steps')}{tail}"
    return f"{event.get('type')} ({event.get('stage')})"


def _name_base(out: Path, job: dict) -> None:
    """A continuing job trained on a model built in its working directory: its adapter's ``citi_job.json`` names
    the base it is served on (the parent's base) instead, and the model it continued from."""
    path = out / "citi_job.json"
    if path.is_file():
        record = json.loads(path.read_text())
        record.update(base_model=job["model"], continued_from=job.get("parent_model"))
        path.write_text(json.dumps(record, indent=1, default=str))


def _report_summary(path: Path) -> dict | None:
    """The headline numbers of report.json (the full report is served by GET /jobs/{id}/report)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict):
        return None
    summary = report.get("summary") if isinstance(report.get("summary"), dict) else report
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}


if __name__ == "__main__":
    run_rank_process()
