"""The job store in Redis: file records, job records, progress events, leases and cancel flags.

Everything the API and the workers share goes through here; the two never talk directly. What a record
and an event hold is in :mod:`citi_service.records`.

Layout (all keys under ``citi:``; one Redis, no cluster):

- ``file:<id>`` (JSON string) a file record; ``files:<tenant>`` (zset by creation order) its tenant's files.
- ``job:<id>`` (hash; every value JSON-encoded) a job record; ``jobs:<tenant>`` (zset by creation order).
- ``job:<id>:events`` (stream; entry id ``<seq>-0``) the job's events, ``job:<id>:evseq`` their counter.
  The event ``seq`` is the SSE event id, so ``Last-Event-ID`` resumes a stream exactly.
- ``job:<id>:lease`` (string with expiry) the token of the worker running the job.
- ``job:<id>:cancel`` the cancel flag; ``job:<id>:pause`` the pause flag (the job stops at its next checkpoint);
  ``job:<id>:checkpoints`` (list) checkpoint records.
- ``active:<tenant>`` (set) the tenant's unfinished jobs; ``queue`` (zset) jobs waiting for a worker, in
  order; ``running`` (set) jobs a worker claimed; ``finished`` (zset by finish time) for retention. A ``paused``
  job is in none of ``queue`` and ``running``, holds no lease and stays in ``active:<tenant>``.
- ``models:<tenant>`` (hash) fine_tuned_model id -> job id; ``idem:<tenant>:<sha256>`` idempotency keys;
  ``usage:<tenant>`` (hash) bytes and files stored; ``status_counts`` (hash) jobs by status;
  ``workers`` (hash) worker heartbeats.

Status changes, job creation, claims and re-queues are Lua scripts, so each is atomic: a job is
claimed by one worker at a time, a cancelled job is never started, and a status event is written
together with the status it reports.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from citi_service.records import RESULT_FILE_PURPOSE, STATUSES, Event, JobRecord, new_event, status_event

PREFIX = "citi:"
EVENT_STREAM_MAXLEN = 100_000
IDEMPOTENCY_TTL_S = 24 * 3600


def _enc(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _dec(value: str | bytes | None) -> Any:
    return None if value is None else json.loads(value)


# Shared Lua helpers. `P` is the key prefix; statuses arrive JSON-encoded, as they are stored.
_LUA_LIB = """
local P = ARGV[1]
local function is_terminal(s)
  return s == '"succeeded"' or s == '"failed"' or s == '"cancelled"'
end
local function add_event(job_id, event_json)
  local seq = redis.call('INCR', P .. 'job:' .. job_id .. ':evseq')
  redis.call('XADD', P .. 'job:' .. job_id .. ':events', 'MAXLEN', '~', EVENT_STREAM_MAXLEN, seq .. '-0', 'e', event_json)
  return seq
end
local function set_status(job_id, old, new, now)
  local key = P .. 'job:' .. job_id
  redis.call('HSET', key, 'status', new)
  if old then redis.call('HINCRBY', P .. 'status_counts', old, -1) end
  redis.call('HINCRBY', P .. 'status_counts', new, 1)
  if new ~= '"queued"' then redis.call('ZREM', P .. 'queue', job_id) end
  if is_terminal(new) then
    local tenant = cjson.decode(redis.call('HGET', key, 'tenant'))
    redis.call('SREM', P .. 'active:' .. tenant, job_id)
    redis.call('SREM', P .. 'running', job_id)
    redis.call('ZADD', P .. 'finished', now, job_id)
    redis.call('HSET', key, 'finished_at', math.floor(now))
    redis.call('DEL', P .. 'job:' .. job_id .. ':cancel')
    redis.call('DEL', P .. 'job:' .. job_id .. ':pause')
  end
end
""".replace("EVENT_STREAM_MAXLEN", str(EVENT_STREAM_MAXLEN))

# ARGV: P, job_id, idem_key ('' for none), idem_value, idem_ttl, max_active, queued_event, field, value, ...
_CREATE_JOB = _LUA_LIB + """
local job_id = ARGV[2]
local tenant = cjson.decode(ARGV[9])
local tenant_active = P .. 'active:' .. tenant
if ARGV[3] ~= '' then
  local existing = redis.call('GET', ARGV[3])
  if existing then return {'existing', existing} end
end
local n_active = redis.call('SCARD', tenant_active)
if n_active >= tonumber(ARGV[6]) then return {'limit', tostring(n_active)} end
local seq = redis.call('INCR', P .. 'seq')
local key = P .. 'job:' .. job_id
for i = 8, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
redis.call('HSET', key, 'seq', seq, 'status', '"queued"')
redis.call('HINCRBY', P .. 'status_counts', '"queued"', 1)
redis.call('ZADD', P .. 'jobs:' .. tenant, seq, job_id)
redis.call('SADD', tenant_active, job_id)
redis.call('ZADD', P .. 'queue', seq, job_id)
if ARGV[3] ~= '' then redis.call('SET', ARGV[3], ARGV[4], 'EX', tonumber(ARGV[5])) end
add_event(job_id, ARGV[7])
return {'created', tostring(seq)}
"""

# ARGV: P, job_id, new_status, token ('' = no lease check), now, event_json ('' = none), n_from, from..., field, value...
_TRANSITION = _LUA_LIB + """
local job_id = ARGV[2]
local key = P .. 'job:' .. job_id
local cur = redis.call('HGET', key, 'status')
if not cur then return {'missing', ''} end
if ARGV[4] ~= '' and redis.call('GET', key .. ':lease') ~= ARGV[4] then return {'lease_lost', cur} end
local n = tonumber(ARGV[7])
local allowed = (n == 0)
for i = 1, n do if ARGV[7 + i] == cur then allowed = true end end
if not allowed then return {'refused', cur} end
for i = 8 + n, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
if ARGV[3] ~= cur then set_status(job_id, cur, ARGV[3], tonumber(ARGV[5])) end
if ARGV[6] ~= '' then add_event(job_id, ARGV[6]) end
return {'ok', cur}
"""

# ARGV: P, job_id, token, lease_ms, worker_json, now, claim_event_json
_CLAIM = _LUA_LIB + """
local job_id = ARGV[2]
local key = P .. 'job:' .. job_id
local cur = redis.call('HGET', key, 'status')
if not cur then return {'missing', ''} end
if is_terminal(cur) then return {'terminal', cur} end
if redis.call('EXISTS', key .. ':lease') == 1 then return {'leased', cur} end
if cur == '"cancelling"' then return {'cancelling', cur} end
if cur == '"paused"' then return {'paused', cur} end
redis.call('SET', key .. ':lease', ARGV[3], 'PX', tonumber(ARGV[4]))
local attempts = tonumber(redis.call('HGET', key, 'attempts') or '0') + 1
redis.call('HSET', key, 'attempts', attempts, 'worker', ARGV[5])
if not redis.call('HGET', key, 'started_at') or redis.call('HGET', key, 'started_at') == 'null' then
  redis.call('HSET', key, 'started_at', math.floor(tonumber(ARGV[6])))
end
redis.call('SADD', P .. 'running', job_id)
set_status(job_id, cur, '"validating_files"', tonumber(ARGV[6]))
add_event(job_id, ARGV[7])
return {'claimed', tostring(attempts)}
"""

# ARGV: P, job_id, max_attempts, now, requeue_event, fail_event, cancel_event, fail_error_json
_REQUEUE = _LUA_LIB + """
local job_id = ARGV[2]
local key = P .. 'job:' .. job_id
if redis.call('EXISTS', key .. ':lease') == 1 then return 'alive' end
if redis.call('SREM', P .. 'running', job_id) == 0 then return 'gone' end
local cur = redis.call('HGET', key, 'status')
if not cur or is_terminal(cur) or cur == '"paused"' then return 'gone' end
local now = tonumber(ARGV[4])
if cur == '"cancelling"' then
  set_status(job_id, cur, '"cancelled"', now)
  add_event(job_id, ARGV[7])
  return 'cancelled'
end
-- Claims after a resume were not lost workers: they do not count against max_attempts.
local attempts = tonumber(redis.call('HGET', key, 'attempts') or '0') - tonumber(redis.call('HGET', key, 'resumes') or '0')
if attempts >= tonumber(ARGV[3]) then
  redis.call('HSET', key, 'error', ARGV[8])
  set_status(job_id, cur, '"failed"', now)
  add_event(job_id, ARGV[6])
  return 'failed'
end
set_status(job_id, cur, '"queued"', now)
redis.call('ZADD', P .. 'queue', redis.call('INCR', P .. 'seq'), job_id)
add_event(job_id, ARGV[5])
return 'requeued'
"""

# ARGV: P, job_id, event_json. A running job gets its pause flag (its worker stops at the next checkpoint).
_REQUEST_PAUSE = _LUA_LIB + """
local job_id = ARGV[2]
local key = P .. 'job:' .. job_id
local cur = redis.call('HGET', key, 'status')
if not cur then return {'missing', ''} end
if cur ~= '"running"' then return {'refused', cur} end
if redis.call('EXISTS', key .. ':pause') == 1 then return {'already', cur} end
redis.call('SET', key .. ':pause', '1')
redis.call('HSET', key, 'pause_requested', 'true')
add_event(job_id, ARGV[3])
return {'ok', cur}
"""

# ARGV: P, job_id, token, now, paused_event_json. The worker holding the lease parks its running job: paused, out of
# `running`, its lease dropped (a resumed job is claimed at once), its checkpoints kept.
_PAUSE = _LUA_LIB + """
local job_id = ARGV[2]
local key = P .. 'job:' .. job_id
local cur = redis.call('HGET', key, 'status')
if not cur then return {'missing', ''} end
if redis.call('GET', key .. ':lease') ~= ARGV[3] then return {'lease_lost', cur} end
if cur ~= '"running"' then return {'refused', cur} end
set_status(job_id, cur, '"paused"', tonumber(ARGV[4]))
redis.call('SREM', P .. 'running', job_id)
redis.call('DEL', key .. ':lease', key .. ':pause')
redis.call('HSET', key, 'pause_requested', 'false', 'estimated_finish', 'null')
add_event(job_id, ARGV[5])
return {'ok', cur}
"""

# ARGV: P, job_id, now, queued_event_json. A paused job goes back to the end of the queue.
_RESUME = _LUA_LIB + """
local job_id = ARGV[2]
local key = P .. 'job:' .. job_id
local cur = redis.call('HGET', key, 'status')
if not cur then return {'missing', ''} end
if cur ~= '"paused"' then return {'refused', cur} end
set_status(job_id, cur, '"queued"', tonumber(ARGV[3]))
redis.call('ZADD', P .. 'queue', redis.call('INCR', P .. 'seq'), job_id)
redis.call('HINCRBY', key, 'resumes', 1)
add_event(job_id, ARGV[4])
return {'ok', cur}
"""

# KEYS: lease. ARGV: token, lease_ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class StoreError(Exception):
    """Base class for refusals from the store."""


class LimitExceeded(StoreError):
    """The tenant already has as many unfinished jobs as it may."""

    def __init__(self, active: int):
        super().__init__(f"{active} unfinished jobs")
        self.active = active


class IdempotencyConflict(StoreError):
    """An Idempotency-Key reused with a different request body."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id


class Store:
    """Redis-backed records of files, jobs and events. Thread-safe (redis-py pools its connections)."""

    def __init__(self, redis_url: str, *, prefix: str = PREFIX, outage_s: float = 0.0, async_connections: int = 100):
        """``outage_s``: how long a command waits out Redis not answering (a restart) before raising.

        The API leaves it at 0 (a request fails fast with an error); workers and training processes wait,
        so a Redis restart does not fail the jobs they run. ``async_connections``: the asyncio client's pool
        (one connection per open event stream at most; the API sizes it from its stream limit).
        """
        self.url = redis_url
        self.async_connections = async_connections
        self.prefix = prefix
        options: dict[str, Any] = {}
        if outage_s > 0:
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry

            # Connection refused fails at once, so each retry costs about its backoff (at most 1 s).
            options["retry"] = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=int(outage_s) + 10)
        self.r = redis.Redis.from_url(redis_url, decode_responses=True, health_check_interval=30, **options)
        self._async = None
        self._create_job = self.r.register_script(_CREATE_JOB)
        self._transition = self.r.register_script(_TRANSITION)
        self._claim = self.r.register_script(_CLAIM)
        self._requeue = self.r.register_script(_REQUEUE)
        self._request_pause = self.r.register_script(_REQUEST_PAUSE)
        self._pause = self.r.register_script(_PAUSE)
        self._resume = self.r.register_script(_RESUME)
        self._renew = self.r.register_script(_RENEW)
        self._release = self.r.register_script(_RELEASE)
        self._add_event = self.r.register_script(_LUA_LIB + "return add_event(ARGV[2], ARGV[3])")

    def k(self, *parts: str) -> str:
        """A key under the store's prefix."""
        return self.prefix + ":".join(parts)

    def ping(self) -> bool:
        """Whether Redis answers."""
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        """Release connections."""
        self.r.close()

    # -- files --------------------------------------------------------------------------------------

    def create_file(self, record: dict) -> None:
        """Store an uploaded file's record (``id``, ``tenant``, ``bytes`` required) and count it in the tenant's
        usage."""
        tenant = record["tenant"]
        pipe = self.r.pipeline()
        pipe.set(self.k("file", record["id"]), _enc(record))
        pipe.zadd(self.k("files", tenant), {record["id"]: self.r.incr(self.k("seq"))})
        pipe.hincrby(self.k("usage", tenant), "bytes", int(record["bytes"]))
        pipe.hincrby(self.k("usage", tenant), "files", 1)
        pipe.execute()

    def add_result_files(self, records: list[dict]) -> None:
        """Register a succeeded job's result files (purpose ``fine-tune-results``, each with its ``job_id``).

        Their bytes are the job's artifacts, counted in the tenant's usage with the job (``adapter_bytes``), so
        they are not counted again here; they disappear with the job's artifacts (job or model deleted, retention).
        """
        if not records:
            return
        pipe = self.r.pipeline()
        for record in records:
            pipe.set(self.k("file", record["id"]), _enc({**record, "counted": False}))
            pipe.zadd(self.k("files", record["tenant"]), {record["id"]: self.r.incr(self.k("seq"))})
        pipe.execute()

    def _forget_result_files(self, pipe, tenant: str, file_ids: Iterable[str]) -> None:
        for file_id in file_ids or ():
            pipe.delete(self.k("file", file_id))
            pipe.zrem(self.k("files", tenant), file_id)

    def _artifacts_gone(self, records: list[dict]) -> set[str]:
        """Ids of the result files among ``records`` whose job's artifacts are gone (deleted, swept by retention)."""
        results = [r for r in records if r.get("purpose") == RESULT_FILE_PURPOSE and r.get("job_id")]
        if not results:
            return set()
        pipe = self.r.pipeline()
        for record in results:
            pipe.hget(self.k("job", record["job_id"]), "artifacts_deleted")
        return {r["id"] for r, deleted in zip(results, pipe.execute(), strict=True) if deleted in (None, "true")}

    def get_file(self, tenant: str, file_id: str) -> dict | None:
        """The tenant's file record, or None (absent, another tenant's, or a result file whose job's artifacts are
        gone)."""
        record = _dec(self.r.get(self.k("file", file_id)))
        if record is None or record.get("tenant") != tenant or self._artifacts_gone([record]):
            return None
        return record

    def list_files(self, tenant: str, *, after: str | None = None, limit: int = 100,
                   purpose: str | None = None, order: str = "desc") -> tuple[list[dict], bool]:
        """The tenant's files, newest first (``order="asc"``: oldest first), starting after the file id ``after``;
        and whether more follow."""
        ids = self._page_ids(self.k("files", tenant), after, ascending=order == "asc")
        out: list[dict] = []
        for chunk in _chunks(ids, 200):
            records = [r for r in (_dec(raw) for raw in self.r.mget([self.k("file", i) for i in chunk])) if r]
            gone = self._artifacts_gone(records)
            for record in records:
                if record["id"] in gone or (purpose and record.get("purpose") != purpose):
                    continue
                if len(out) == limit:
                    return out, True
                out.append(record)
        return out, False

    def delete_file(self, tenant: str, file_id: str) -> dict | None:
        """Remove a file record (the caller removes the stored bytes); returns the record, or None."""
        record = self.get_file(tenant, file_id)
        if record is None:
            return None
        pipe = self.r.pipeline()
        pipe.delete(self.k("file", file_id))
        pipe.zrem(self.k("files", tenant), file_id)
        if record.get("counted", True):  # a result file's bytes go with its job's (add_result_files)
            pipe.hincrby(self.k("usage", tenant), "bytes", -int(record["bytes"]))
            pipe.hincrby(self.k("usage", tenant), "files", -1)
        pipe.execute()
        return record

    def usage(self, tenant: str) -> dict[str, int]:
        """Bytes and files the tenant stores (files and adapters)."""
        raw = self.r.hgetall(self.k("usage", tenant))
        return {"bytes": int(raw.get("bytes", 0)), "files": int(raw.get("files", 0))}

    def add_usage(self, tenant: str, nbytes: int) -> None:
        """Count ``nbytes`` more (or fewer, when negative) against the tenant's storage."""
        self.r.hincrby(self.k("usage", tenant), "bytes", int(nbytes))

    # -- jobs ---------------------------------------------------------------------------------------

    def create_job(
        self,
        record: JobRecord,
        *,
        max_active: int,
        idempotency_key: str | None = None,
        body_hash: str = "",
    ) -> tuple[JobRecord, bool]:
        """Create a queued job unless the idempotency key names one already; returns ``(job, created)``.

        Raises :class:`LimitExceeded` when the tenant has ``max_active`` unfinished jobs and
        :class:`IdempotencyConflict` when the key was used with a different body.
        """
        tenant, job_id = record["tenant"], record["id"]
        idem = ""
        if idempotency_key:
            digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
            idem = self.k("idem", tenant, digest)
        # The script reads the tenant from the first field/value pair (ARGV[8], ARGV[9]).
        fields: list[str] = ["tenant", _enc(tenant)]
        for name, value in record.items():
            if name not in ("status", "seq", "tenant"):
                fields += [name, _enc(value)]
        event = status_event("queued", "job created and queued")
        outcome, value = self._create_job(
            args=[self.prefix, job_id, idem, f"{job_id} {body_hash}", IDEMPOTENCY_TTL_S, max_active, _enc(event),
                  *fields],
        )
        if outcome == "existing":
            existing_id, _, existing_hash = value.partition(" ")
            if existing_hash != body_hash:
                raise IdempotencyConflict(existing_id)
            job = self.get_job(existing_id)
            if job is not None:
                return job, False
            # The job was deleted since: the key is stale, so this request creates a new job.
            self.r.delete(idem)
            return self.create_job(record, max_active=max_active, idempotency_key=idempotency_key,
                                   body_hash=body_hash)
        if outcome == "limit":
            raise LimitExceeded(int(value))
        job = self.get_job(job_id)
        assert job is not None
        return job, True

    def get_job(self, job_id: str) -> JobRecord | None:
        """A job record by id, whoever owns it (workers use this; the API uses :meth:`get_job_for`)."""
        raw = self.r.hgetall(self.k("job", job_id))
        if not raw:
            return None
        return {name: _dec(value) for name, value in raw.items()}

    def get_job_for(self, tenant: str, job_id: str) -> JobRecord | None:
        """The tenant's job, or None (absent or another tenant's)."""
        job = self.get_job(job_id)
        if job is None or job.get("tenant") != tenant:
            return None
        return job

    def get_job_by_model(self, tenant: str, fine_tuned_model: str) -> JobRecord | None:
        """The tenant's succeeded job whose ``fine_tuned_model`` id is given, or None."""
        job_id = self.r.hget(self.k("models", tenant), fine_tuned_model)
        if job_id is None:
            return None
        job = self.get_job_for(tenant, job_id)
        if job is None or job.get("status") != "succeeded" or job.get("artifacts_deleted"):
            return None
        return job

    def remove_model(self, tenant: str, fine_tuned_model: str) -> dict | None:
        """Unlist the tenant's fine-tuned model and mark its job's artifacts deleted (the caller deletes the files);
        returns the job, or None when the model is not (or no longer) the tenant's. Of concurrent callers one wins."""
        job = self.get_job_by_model(tenant, fine_tuned_model)
        if job is None or not self.r.hdel(self.k("models", tenant), fine_tuned_model):
            return None
        self.update_job(job["id"], artifacts_deleted=True)
        self.forget_finished(job["id"])
        pipe = self.r.pipeline()
        self._forget_result_files(pipe, tenant, job.get("result_files") or [])
        pipe.execute()
        return job

    def list_jobs(self, tenant: str, *, after: str | None = None, limit: int = 20,
                  status: str | None = None, metadata: dict[str, str] | None = None) -> tuple[list[dict], bool]:
        """The tenant's jobs, newest first, after the job id ``after``, optionally of one status and only those
        whose metadata holds every pair of ``metadata``."""
        ids = self._page_ids(self.k("jobs", tenant), after)
        out: list[dict] = []
        for chunk in _chunks(ids, 100):
            pipe = self.r.pipeline()
            for job_id in chunk:
                pipe.hgetall(self.k("job", job_id))
            for raw in pipe.execute():
                if not raw:
                    continue
                job = {name: _dec(value) for name, value in raw.items()}
                if status and job.get("status") != status:
                    continue
                if metadata and any((job.get("metadata") or {}).get(k) != v for k, v in metadata.items()):
                    continue
                if len(out) == limit:
                    return out, True
                out.append(job)
        return out, False

    def _page_ids(self, zkey: str, after: str | None, *, ascending: bool = False) -> list[str]:
        if after:
            score = self.r.zscore(zkey, after)
            if score is None:
                return []
            if ascending:
                return self.r.zrangebyscore(zkey, f"({score}", "+inf")
            return self.r.zrevrangebyscore(zkey, f"({score}", "-inf")
        return self.r.zrange(zkey, 0, -1) if ascending else self.r.zrevrange(zkey, 0, -1)

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Set fields of a job record (not its status: use :meth:`transition`)."""
        assert "status" not in fields
        if fields:
            self.r.hset(self.k("job", job_id), mapping={n: _enc(v) for n, v in fields.items()})

    def transition(
        self,
        job_id: str,
        to: str,
        *,
        from_: Iterable[str] = (),
        token: str | None = None,
        event: Event | None = None,
        **fields: Any,
    ) -> tuple[str, str | None]:
        """Atomically move a job to status ``to`` (setting ``fields`` and adding ``event``).

        Only from a status in ``from_`` (any when empty) and, with ``token``, only while that worker holds
        the lease. Returns ``(outcome, previous status)``; outcome is ``ok``, ``refused``, ``lease_lost``
        or ``missing``.
        """
        assert to in STATUSES
        from_ = list(from_)
        pairs: list[str] = []
        for name, value in fields.items():
            pairs += [name, _enc(value)]
        outcome, previous = self._transition(
            args=[self.prefix, job_id, _enc(to), token or "", time.time(), _enc(event) if event else "",
                  len(from_), *[_enc(s) for s in from_], *pairs],
        )
        if outcome == "ok" and to == "succeeded" and fields.get("fine_tuned_model"):
            job = self.get_job(job_id) or {}
            self.r.hset(self.k("models", job.get("tenant", "")), fields["fine_tuned_model"], job_id)
        return outcome, (_dec(previous) if previous else None)

    def queue_position(self, job_id: str) -> int | None:
        """1-based place of a queued job among all queued jobs (1 is next), else None."""
        rank = self.r.zrank(self.k("queue"), job_id)
        return None if rank is None else rank + 1

    def delete_job(self, job_id: str) -> None:
        """Remove a job record, its events, checkpoints records and index entries."""
        job = self.get_job(job_id)
        if job is None:
            return
        tenant = job["tenant"]
        pipe = self.r.pipeline()
        for suffix in ("", ":events", ":evseq", ":lease", ":cancel", ":pause", ":checkpoints"):
            pipe.delete(self.k("job", job_id) + suffix)
        self._forget_result_files(pipe, tenant, job.get("result_files") or [])
        pipe.zrem(self.k("jobs", tenant), job_id)
        pipe.srem(self.k("active", tenant), job_id)
        pipe.zrem(self.k("queue"), job_id)
        pipe.srem(self.k("running"), job_id)
        pipe.zrem(self.k("finished"), job_id)
        pipe.hincrby(self.k("status_counts"), _enc(job["status"]), -1)
        if job.get("fine_tuned_model"):
            pipe.hdel(self.k("models", tenant), job["fine_tuned_model"])
        pipe.execute()

    def active_jobs(self, tenant: str) -> list[dict]:
        """The tenant's unfinished jobs."""
        ids = self.r.smembers(self.k("active", tenant))
        return [j for j in (self.get_job(i) for i in ids) if j is not None]

    # -- cancel -------------------------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> tuple[str, str | None]:
        """Cancel a job: a queued one at once, a running one through the flag its worker checks every step.

        Returns ``(outcome, status before)``: ``cancelled``, ``cancelling``, ``already`` (cancelling or
        cancelled before) or ``finished`` (succeeded or failed: nothing to cancel), or ``missing``.
        """
        self.r.set(self.k("job", job_id, "cancel"), "1")
        event = status_event("cancelled", "cancelled before it started")
        outcome, prev = self.transition(job_id, "cancelled", from_=["queued"], event=event)
        if outcome == "ok":
            return "cancelled", prev
        event = status_event("cancelled", "cancelled while paused; its checkpoints are deleted")
        outcome, prev = self.transition(job_id, "cancelled", from_=["paused"], event=event)
        if outcome == "ok":
            return "cancelled", prev
        event = status_event("cancelling", "cancel requested; stopping at the next step")
        outcome, prev = self.transition(job_id, "cancelling", from_=["validating_files", "running"], event=event)
        if outcome == "ok":
            return "cancelling", prev
        if outcome == "missing":
            self.r.delete(self.k("job", job_id, "cancel"))
            return "missing", None
        if prev in ("cancelling", "cancelled"):
            return "already", prev
        self.r.delete(self.k("job", job_id, "cancel"))
        return "finished", prev

    def cancel_requested(self, job_id: str) -> bool:
        """Whether the job's cancel flag is set."""
        return bool(self.r.exists(self.k("job", job_id, "cancel")))

    # -- pause and resume ---------------------------------------------------------------------------

    def request_pause(self, job_id: str) -> tuple[str, str | None]:
        """Ask a running job to pause: its worker stops it at its next checkpoint (:meth:`pause`).

        Returns ``(outcome, status)``: ``ok`` (asked now), ``already`` (asked before), ``refused`` (the job is not
        running) or ``missing``.
        """
        event = new_event("message", "pause requested; the job stops at its next checkpoint",
                          {"pause_requested": True})
        outcome, cur = self._request_pause(args=[self.prefix, job_id, _enc(event)])
        return outcome, (_dec(cur) if cur else None)

    def pause_requested(self, job_id: str) -> bool:
        """Whether the job's pause flag is set."""
        return bool(self.r.exists(self.k("job", job_id, "pause")))

    def pause(self, job_id: str, token: str, message: str, **data: Any) -> tuple[str, str | None]:
        """Worker side: park the running job this ``token`` holds as ``paused`` (its checkpoints stay where they are).

        Returns ``(outcome, previous status)``: ``ok``, ``refused`` (no longer running: cancelled meanwhile),
        ``lease_lost`` or ``missing``.
        """
        event = status_event("paused", message, **data)
        outcome, cur = self._pause(args=[self.prefix, job_id, token, time.time(), _enc(event)])
        return outcome, (_dec(cur) if cur else None)

    def resume(self, job_id: str) -> tuple[str, str | None]:
        """Queue a paused job again (the caller sends its task); it continues from its checkpoint.

        Returns ``(outcome, status before)``: ``ok``, ``refused`` (not paused) or ``missing``.
        """
        event = status_event("queued", "resumed; queued to continue from its last checkpoint", reason="resumed")
        outcome, cur = self._resume(args=[self.prefix, job_id, time.time(), _enc(event)])
        return outcome, (_dec(cur) if cur else None)

    # -- leases (worker side) -----------------------------------------------------------------------

    def claim(self, job_id: str, token: str, worker: str, lease_s: float) -> tuple[str, str | None]:
        """Atomically take a job for this worker (lease ``token`` for ``lease_s``).

        Returns ``(outcome, detail)``: ``claimed`` (detail: attempt number), ``terminal``, ``leased`` (another
        worker holds it), ``cancelling`` (cancelled while its last worker was lost) or ``missing``.
        """
        event = status_event("validating_files", f"started on worker {worker}; checking the data", worker=worker)
        outcome, detail = self._claim(args=[self.prefix, job_id, token, int(lease_s * 1000), _enc(worker),
                                            time.time(), _enc(event)])
        return outcome, detail

    def renew_lease(self, job_id: str, token: str, lease_s: float) -> bool:
        """Extend the lease if ``token`` still holds it."""
        return bool(self._renew(keys=[self.k("job", job_id, "lease")], args=[token, int(lease_s * 1000)]))

    def release_lease(self, job_id: str, token: str) -> bool:
        """Drop the lease if ``token`` holds it."""
        return bool(self._release(keys=[self.k("job", job_id, "lease")], args=[token]))

    def runner_check(self, job_id: str, token: str) -> tuple[bool, bool]:
        """``(cancel requested, lease still ours)`` in one round trip."""
        cancel, owned, _ = self.runner_state(job_id, token)
        return cancel, owned

    def runner_state(self, job_id: str, token: str) -> tuple[bool, bool, bool]:
        """``(cancel requested, lease still ours, pause requested)`` in one round trip: the runner asks this every
        step."""
        cancel, holder, pause = self.r.mget([self.k("job", job_id, "cancel"), self.k("job", job_id, "lease"),
                                             self.k("job", job_id, "pause")])
        return cancel is not None, holder == token, pause is not None

    def lapsed_jobs(self) -> list[str]:
        """Claimed jobs whose lease has expired (their worker stopped renewing it)."""
        ids = list(self.r.smembers(self.k("running")))
        if not ids:
            return []
        pipe = self.r.pipeline()
        for job_id in ids:
            pipe.exists(self.k("job", job_id, "lease"))
        return [job_id for job_id, alive in zip(ids, pipe.execute(), strict=True) if not alive]

    def requeue(self, job_id: str, max_attempts: int, *, reason: str = "lease_lapsed") -> str:
        """Put a job whose lease lapsed back in the queue, once, however many reapers try.

        Returns ``requeued`` (the caller sends the task), ``failed`` (too many attempts), ``cancelled`` (a
        cancel was pending), ``alive`` (its lease is held again) or ``gone`` (another reaper did it, or it ended).
        """
        why = {"lease_lapsed": "the worker running this job stopped answering",
               "worker_shutdown": "the worker running this job shut down",
               "training_process_lost": "one of this job's training processes was killed"}.get(reason, reason)
        requeue = status_event("queued", f"{why}; queued again to resume from its last checkpoint", reason=reason,
                               level="warning")
        if reason == "training_process_lost":
            error = {"code": "training_process_lost", "param": None,
                     "message": f"a training process of the job was killed in each of its {max_attempts} attempts "
                                "(most often by the kernel's out-of-memory killer); the job was given up: give it "
                                "a smaller batch_size or max_length, or fewer GPUs per job"}
        else:
            error = {"code": "worker_lost", "param": None,
                     "message": f"the job's worker was lost {max_attempts} times; the job was given up"}
        fail = status_event("failed", error["message"], error=error, level="error")
        cancel = status_event("cancelled", "cancelled (its worker was lost while stopping)")
        return self._requeue(args=[self.prefix, job_id, max_attempts, time.time(), _enc(requeue), _enc(fail),
                                   _enc(cancel), _enc(error)])

    # -- events -------------------------------------------------------------------------------------

    def add_event(self, job_id: str, type_: str, message: str, data: dict | None = None,
                  level: str = "info") -> int:
        """Append an event to the job's stream; returns its ``seq``."""
        return int(self._add_event(args=[self.prefix, job_id, _enc(new_event(type_, message, data, level))]))

    def list_events(self, job_id: str, *, after: int = 0, limit: int = 100) -> tuple[list[dict], bool]:
        """Events with ``seq > after``, oldest first; and whether more follow."""
        entries = self.r.xrange(self.k("job", job_id, "events"), min=f"({after}-0" if after else "-",
                                count=limit + 1)
        events = [_event(entry_id, fields) for entry_id, fields in entries]
        return events[:limit], len(events) > limit

    def list_events_newest_first(self, job_id: str, *, before: int | None = None,
                                 limit: int = 100) -> tuple[list[dict], bool]:
        """Events with ``seq < before`` (all when None), newest first; and whether older ones follow."""
        entries = self.r.xrevrange(self.k("job", job_id, "events"), max=f"({before}-0" if before else "+",
                                   count=limit + 1)
        events = [_event(entry_id, fields) for entry_id, fields in entries]
        return events[:limit], len(events) > limit

    def async_redis(self):
        """An asyncio client on the same Redis (for the SSE stream), made on first use."""
        if self._async is None:
            import redis.asyncio as aredis

            # Longer than any XREAD BLOCK we issue, so a quiet stream is never taken for a dead connection.
            self._async = aredis.Redis.from_url(self.url, decode_responses=True, socket_timeout=60,
                                                max_connections=self.async_connections)
        return self._async

    async def read_events_async(self, job_id: str, *, after: int, block_ms: int | None,
                                count: int = 500) -> list[dict]:
        """Events with ``seq > after``, waiting up to ``block_ms`` for the first one (None: no waiting)."""
        reply = await self.async_redis().xread({self.k("job", job_id, "events"): f"{after}-0"}, count=count,
                                               block=block_ms)
        if not reply:
            return []
        return [_event(entry_id, fields) for entry_id, fields in reply[0][1]]

    async def get_status_async(self, job_id: str) -> str | None:
        """The job's status, from the asyncio client."""
        return _dec(await self.async_redis().hget(self.k("job", job_id), "status"))

    # -- checkpoints --------------------------------------------------------------------------------

    def add_checkpoint(self, job_id: str, record: dict) -> None:
        """Record a checkpoint the job wrote."""
        self.r.rpush(self.k("job", job_id, "checkpoints"), _enc(record))

    def list_checkpoints(self, job_id: str) -> list[dict]:
        """The job's checkpoint records, oldest first."""
        return [_dec(x) for x in self.r.lrange(self.k("job", job_id, "checkpoints"), 0, -1)]

    # -- retention ----------------------------------------------------------------------------------

    def finished_before(self, cutoff: float, limit: int = 100) -> list[str]:
        """Jobs that ended before ``cutoff`` (a Unix time) and still hold artifacts."""
        return self.r.zrangebyscore(self.k("finished"), "-inf", cutoff, start=0, num=limit)

    def forget_finished(self, job_id: str) -> None:
        """Stop tracking a finished job for retention (its artifacts are gone)."""
        self.r.zrem(self.k("finished"), job_id)

    # -- metrics ------------------------------------------------------------------------------------

    def status_counts(self) -> dict[str, int]:
        """Jobs in each status."""
        raw = self.r.hgetall(self.k("status_counts"))
        counts = {s: 0 for s in STATUSES}
        for encoded, n in raw.items():
            status = _dec(encoded)
            if status in counts:
                counts[status] = max(0, int(n))
        return counts

    def queue_depth(self) -> int:
        """Jobs waiting for a worker."""
        return int(self.r.zcard(self.k("queue")))

    def worker_heartbeat(self, worker: str, info: dict) -> None:
        """Record that ``worker`` is alive (with what it is doing)."""
        self.r.hset(self.k("workers"), worker, _enc({**info, "ts": time.time()}))

    def worker_gone(self, worker: str) -> None:
        """Forget a worker that shut down cleanly."""
        self.r.hdel(self.k("workers"), worker)

    def workers(self) -> dict[str, dict]:
        """Last heartbeat of each worker."""
        return {name: _dec(v) for name, v in self.r.hgetall(self.k("workers")).items()}

    # -- rate limit ---------------------------------------------------------------------------------

    def hit_rate_limit(self, tenant: str, per_minute: int) -> int | None:
        """Count one request; returns seconds to wait when the tenant is over ``per_minute``, else None."""
        window = int(time.time() // 60)
        key = self.k("rate", tenant, str(window))
        pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, 120)
        count, _ = pipe.execute()
        if count > per_minute:
            return max(1, 60 - int(time.time()) % 60)
        return None

    def auth_failures(self, address: str) -> int:
        """Failed authentications from ``address`` in the current minute."""
        return int(self.r.get(self.k("authfail", address, str(int(time.time() // 60)))) or 0)

    def add_auth_failure(self, address: str) -> int:
        """Count one failed authentication from ``address``; returns this minute's count."""
        key = self.k("authfail", address, str(int(time.time() // 60)))
        pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, 120)
        count, _ = pipe.execute()
        return int(count)


def _event(entry_id: str, fields: dict) -> dict:
    event = json.loads(fields["e"])
    seq = int(entry_id.split("-", 1)[0])
    return {"object": "fine_tuning.job.event", "id": str(seq), "seq": seq, **event}


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]
