"""``/v1/files``: upload, list, get and delete training and test files.

Uploads are validated with the engine's torch-free validator one line at a time while they are copied to
storage, so the API's memory holds one line of a file, not the file (every bad line is reported and nothing
is stored); they are limited in size (413) and line length, and counted against the tenant's file and storage
quotas.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from typing import BinaryIO, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from api.deps import get_storage, get_store, get_tenant, settings_dep
from api.schemas import Deleted, ErrorResponse, FileList, FileObject
from citi_service.errors import APIError, not_found
from citi_service.keys import file_key
from citi_service.settings import Settings
from citi_service.storage import Storage
from citi_service.store import Store

router = APIRouter(prefix="/v1/files", tags=["files"])

PURPOSES = ("fine-tune",)
MAX_DETAILS = 1000
CHUNK = 1024 * 1024
TEST_MARKER = b'"ground_truth"'  # a file with this key anywhere is a tool test file
_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


def public_file(record: dict) -> FileObject:
    """The API form of a file record."""
    return FileObject(**{k: v for k, v in record.items() if k in FileObject.model_fields})


def _scan(src: BinaryIO, limit: int) -> tuple[int, bool, bool]:
    """One pass over the spooled upload, a chunk at a time: ``(bytes up to limit + 1, holds a ground_truth key,
    holds anything but whitespace)``."""
    size, test, content, tail = 0, False, False, b""
    while size <= limit and (chunk := src.read(min(CHUNK, limit + 1 - size))):
        size += len(chunk)
        content = content or bool(chunk.strip())
        test = test or TEST_MARKER in tail + chunk  # a marker split between two chunks is found too
        tail = chunk[-(len(TEST_MARKER) - 1):]
    return size, test, content


def _invalid(report) -> APIError:
    """The 400 listing a refused file's problems (the first MAX_DETAILS of them)."""
    shown = report.problems
    listed = "" if len(shown) == report.problem_count else f" (the first {MAX_DETAILS} are listed)"
    where = f" on {report.problem_line_count} line(s)" if report.problem_line_count else ""
    return APIError(
        400,
        "invalid_file",
        f"the file has {report.problem_count} problem(s){where}{listed}; first: {shown[0]}. Fix every line listed "
        "in details and upload it again",
        param="file",
        details=[p.to_dict() for p in shown],
    )


def validate_upload(src: BinaryIO, fmt: str, *, max_line_bytes: int, sink: BinaryIO | None = None):
    """Validate an upload one line at a time as training data (``fmt="train"``) or as a tool test file
    (``"test"``), writing every byte read to ``sink``. Returns the report (counts only, no examples); raises a
    400 listing the problems when the file is refused. Memory holds one line, whatever the file's size."""
    from citi_engine.data.validate import JsonlValidator, validate_stream

    validator = JsonlValidator(purpose=fmt, min_examples=1 if fmt == "test" else 10, keep_examples=False,
                               max_problems=MAX_DETAILS)
    validate_stream(src, validator, max_line_bytes=max_line_bytes, on_chunk=sink.write if sink else None)
    report = validator.finish()
    if not report.ok:
        raise _invalid(report)
    return report


@router.post("", response_model=FileObject, responses={**_ERRORS, 413: {"model": ErrorResponse}})
def upload_file(
    file: UploadFile = File(..., description="JSONL, one chat example a line"),
    purpose: str = Form("fine-tune"),
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    storage: Storage = Depends(get_storage),
    settings: Settings = Depends(settings_dep),
) -> FileObject:
    """Upload a JSONL file of training examples (or tool tests) for fine-tuning."""
    if purpose not in PURPOSES:
        raise APIError(400, "invalid_purpose", f"purpose must be 'fine-tune', got '{purpose}'", param="purpose")
    # The multipart parser has spooled the body to a temporary file (in memory only up to 1 MB); it is read
    # from there in chunks and lines, never whole.
    src = file.file
    size, looks_like_test, has_content = _scan(src, settings.max_upload_bytes)
    if size > settings.max_upload_bytes:
        raise APIError(413, "file_too_large",
                       f"the file is larger than the limit of {settings.max_upload_bytes} bytes; split it or ask for "
                       "a higher CITI_MAX_UPLOAD_BYTES", param="file")
    if not has_content:
        raise APIError(400, "invalid_file", "the file is empty; upload JSONL with one example a line", param="file",
                       details=[{"line": 0, "code": "too_few_examples", "message": "the file is empty"}])
    usage = store.usage(tenant)
    if usage["files"] >= settings.max_files_per_tenant:
        raise APIError(403, "file_quota_exceeded",
                       f"this key already stores {usage['files']} files, the most it may; delete some first "
                       "(DELETE /v1/files/{id})")
    if usage["bytes"] + size > settings.max_storage_bytes_per_tenant:
        raise APIError(403, "storage_quota_exceeded",
                       f"storing this file would use {usage['bytes'] + size} bytes, more than this key's "
                       f"{settings.max_storage_bytes_per_tenant}; delete files or finished jobs first")
    fmt = "test" if looks_like_test else "train"
    src.seek(0)
    file_id = "file-" + secrets.token_hex(12)
    # Checked line by line while copied to a file of its own; stored only when every line is good.
    with tempfile.NamedTemporaryFile(prefix="citi-upload-", suffix=".jsonl") as copy:
        report = validate_upload(src, fmt, max_line_bytes=settings.max_upload_line_bytes, sink=copy)
        copy.flush()
        storage.put_file(file_key(file_id), copy.name)
    record = {
        "id": file_id,
        "tenant": tenant,
        "bytes": size,
        "created_at": int(time.time()),
        "filename": (file.filename or "upload.jsonl")[-255:],
        "purpose": purpose,
        "status": "processed",
        "format": fmt,
        "n_examples": report.n_examples,
        "n_tool": report.n_tool,
        "n_general": report.n_general,
    }
    store.create_file(record)
    return public_file(record)


@router.get("", response_model=FileList, responses=_ERRORS)
def list_files(
    after: str | None = Query(None, description="A file id: list the files after it."),
    limit: int = Query(100, ge=1, le=10000),
    purpose: str | None = None,
    order: Literal["asc", "desc"] = Query("desc", description="By creation time: desc (newest first) or asc."),
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
) -> FileList:
    """The caller's files, newest first (or oldest first with ``order=asc``)."""
    records, has_more = store.list_files(tenant, after=after, limit=limit, purpose=purpose, order=order)
    data = [public_file(r) for r in records]
    return FileList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/{file_id}", response_model=FileObject, responses=_ERRORS)
def get_file(file_id: str, tenant: str = Depends(get_tenant), store: Store = Depends(get_store)) -> FileObject:
    """One of the caller's files."""
    record = store.get_file(tenant, file_id)
    if record is None:
        raise not_found("file", file_id, "file_id")
    return public_file(record)


@router.get("/{file_id}/content", responses=_ERRORS,
            response_class=StreamingResponse)
def file_content(
    file_id: str,
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    storage: Storage = Depends(get_storage),
) -> StreamingResponse:
    """The bytes of one of the caller's files, as uploaded."""
    if store.get_file(tenant, file_id) is None:
        raise not_found("file", file_id, "file_id")
    return StreamingResponse(storage.iter_bytes(file_key(file_id)), media_type="application/jsonl")


@router.delete("/{file_id}", response_model=Deleted, responses={**_ERRORS, 409: {"model": ErrorResponse}})
def delete_file(
    file_id: str,
    tenant: str = Depends(get_tenant),
    store: Store = Depends(get_store),
    storage: Storage = Depends(get_storage),
) -> Deleted:
    """Delete a file (refused while an unfinished job uses it)."""
    if store.get_file(tenant, file_id) is None:
        raise not_found("file", file_id, "file_id")
    for job in store.active_jobs(tenant):
        if file_id in (job.get("training_file"), job.get("validation_file"), job.get("general_file")):
            raise APIError(409, "file_in_use",
                           f"job {job['id']} ({job['status']}) uses this file; cancel it or wait until it ends",
                           param="file_id")
    store.delete_file(tenant, file_id)
    storage.delete(file_key(file_id))
    return Deleted(id=file_id, object="file", deleted=True)
