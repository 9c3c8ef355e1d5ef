"""Artifact storage: one small interface, two backends.

Keys are relative, slash-separated paths (``files/file-abc.jsonl``, ``jobs/ftjob-x/adapter/README.md``);
they are checked so no key can leave its root. :class:`LocalStorage` keeps objects under a directory
(one host: mount it into the API and the workers); :class:`S3Storage` keeps them in an S3-compatible
bucket (several hosts).

The keys the service uses (files, adapters, checkpoints) are spelled in :mod:`citi_service.keys`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_KEY_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")
CHUNK = 1024 * 1024


class StorageKeyError(ValueError):
    """A key that is empty, absolute, or would leave the storage root."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`StorageKeyError`."""
    parts = key.split("/") if isinstance(key, str) else []
    if not parts or any(p in ("", ".", "..") or not _KEY_PART.match(p) for p in parts):
        raise StorageKeyError(f"invalid storage key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A key prefix ending in ``/`` (so ``jobs/a/`` never matches ``jobs/ab``)."""
    check_key(prefix.rstrip("/"))
    return prefix.rstrip("/") + "/"


@dataclass(frozen=True)
class StoredObject:
    """One object: its key and size in bytes."""

    key: str
    size: int


class Storage:
    """The storage interface. Subclasses implement the primitive methods; the directory helpers are shared."""

    name = "abstract"

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (replacing any object there)."""
        raise NotImplementedError

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Store the local file ``path`` under ``key``."""
        raise NotImplementedError

    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the object; raises ``FileNotFoundError`` when there is none."""
        raise NotImplementedError

    def get_file(self, key: str, dest: str | os.PathLike) -> None:
        """Copy the object to the local path ``dest`` (parents created, written atomically)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out, self.open(key) as src:
                shutil.copyfileobj(src, out, CHUNK)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        """The whole object in memory (for small objects)."""
        with self.open(key) as src:
            return src.read()

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        raise NotImplementedError

    def list(self, prefix: str) -> list[StoredObject]:
        """Objects whose key starts with the directory ``prefix``, sorted by key."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove one object (no error when it is absent)."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix``; returns how many there were."""
        objects = self.list(prefix)
        for obj in objects:
            self.delete(obj.key)
        return len(objects)

    def local_path(self, key: str) -> Path | None:
        """The object's path on this host's disk when the backend has one, else ``None``."""
        return None

    def iter_bytes(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The object in chunks, for streaming responses."""
        with self.open(key) as src:
            while chunk := src.read(chunk_size):
                yield chunk

    def upload_dir(self, local_dir: str | os.PathLike, prefix: str, *, exclude: tuple[str, ...] = ()) -> list[str]:
        """Store every file under ``local_dir`` at ``prefix/<relative path>``, skipping top-level names in
        ``exclude``; returns the keys written."""
        prefix = check_prefix(prefix)
        root = Path(local_dir)
        keys = []
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or path.is_symlink() or rel.parts[0] in exclude:
                continue
            key = prefix + rel.as_posix()
            self.put_file(key, path)
            keys.append(key)
        return keys

    def download_dir(self, prefix: str, local_dir: str | os.PathLike) -> int:
        """Copy every object under ``prefix`` into ``local_dir`` (keeping relative paths); returns the count."""
        prefix = check_prefix(prefix)
        objects = self.list(prefix)
        for obj in objects:
            self.get_file(obj.key, Path(local_dir) / obj.key[len(prefix):])
        return len(objects)


class LocalStorage(Storage):
    """Objects as files under ``root``. Writes go to a temporary file first and are renamed into place."""

    name = "local"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write(self, key: str, writer) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                writer(out)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda out: out.write(data))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        def copy(out):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)

        self._write(key, copy)

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[StoredObject]:
        prefix = check_prefix(prefix)
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        out = []
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.is_symlink() and not path.name.startswith(".part-"):
                out.append(StoredObject(path.relative_to(self.root).as_posix(), path.stat().st_size))
        return out

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        count = len(self.list(prefix))
        shutil.rmtree(self._path(check_prefix(prefix).rstrip("/")), ignore_errors=True)
        return count

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


class S3Storage(Storage):
    """Objects in an S3-compatible bucket (AWS, MinIO, moto...), under an optional key prefix."""

    name = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        create_bucket: bool = False,
    ):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = check_prefix(prefix) if prefix.strip("/") else ""
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"}),
        )
        if create_bucket:
            self.ensure_bucket()

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def open(self, key: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(key) from exc
            raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise

    def list(self, prefix: str) -> list[StoredObject]:
        full = self.prefix + check_prefix(prefix)
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for item in page.get("Contents", []):
                out.append(StoredObject(item["Key"][len(self.prefix):], int(item["Size"])))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        objects = self.list(prefix)
        for start in range(0, len(objects), 1000):  # the API's batch limit
            batch = [{"Key": self.prefix + o.key} for o in objects[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(objects)


def make_storage(settings) -> Storage:
    """The backend ``settings.storage`` names, configured from ``settings``."""
    if settings.storage == "s3":
        return S3Storage(
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
        )
    return LocalStorage(settings.artifact_dir)
