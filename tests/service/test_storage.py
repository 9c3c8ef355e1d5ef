"""The storage interface, the same tests for both backends: a local directory and a real S3-compatible
server (moto's standalone server); and the streamed .tar.gz built from either."""

from __future__ import annotations

import io
import os
import tarfile
import uuid

import pytest

from api.archive import stream_tar_gz
from citi_service.storage import LocalStorage, StorageKeyError
from tests.service.conftest import s3_storage

pytestmark = pytest.mark.service


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    endpoint = request.getfixturevalue("moto_s3")
    return s3_storage(endpoint, f"test-{uuid.uuid4().hex[:12]}", prefix="some/prefix")


def test_objects_round_trip_and_list_by_directory_prefix(storage, tmp_path):
    storage.put_bytes("jobs/a/adapter/config.json", b'{"r": 8}')
    storage.put_bytes("jobs/a/adapter/sub/weights.bin", os.urandom(3000))
    storage.put_bytes("jobs/ab/other.txt", b"not under jobs/a/")
    assert storage.get_bytes("jobs/a/adapter/config.json") == b'{"r": 8}'
    assert storage.exists("jobs/a/adapter/config.json") and not storage.exists("jobs/a/nothing")
    listed = storage.list("jobs/a/")
    assert [o.key for o in listed] == ["jobs/a/adapter/config.json", "jobs/a/adapter/sub/weights.bin"]
    assert [o.size for o in listed] == [8, 3000]
    assert storage.list("jobs/zzz/") == []
    with pytest.raises(FileNotFoundError):
        storage.get_bytes("jobs/a/missing")

    storage.get_file("jobs/a/adapter/sub/weights.bin", tmp_path / "dl" / "w.bin")
    assert (tmp_path / "dl" / "w.bin").read_bytes() == storage.get_bytes("jobs/a/adapter/sub/weights.bin")
    assert b"".join(storage.iter_bytes("jobs/a/adapter/sub/weights.bin", chunk_size=1000)) == \
        (tmp_path / "dl" / "w.bin").read_bytes()

    assert storage.delete_prefix("jobs/a/") == 2
    assert storage.list("jobs/a/") == [] and storage.exists("jobs/ab/other.txt")
    storage.delete("jobs/ab/other.txt")
    storage.delete("jobs/ab/other.txt")  # deleting what is gone is fine
    assert not storage.exists("jobs/ab/other.txt")


def test_directories_upload_with_exclusions_and_download_back(storage, tmp_path):
    src = tmp_path / "out"
    (src / "checkpoints" / "step-1").mkdir(parents=True)
    (src / "checkpoints" / "step-1" / "meta.json").write_text("{}")
    (src / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (src / "plots").mkdir()
    (src / "plots" / "loss.png").write_bytes(b"png")
    keys = storage.upload_dir(src, "jobs/x/adapter", exclude=("checkpoints",))
    assert keys == ["jobs/x/adapter/adapter_model.safetensors", "jobs/x/adapter/plots/loss.png"]
    assert storage.download_dir("jobs/x/adapter/", tmp_path / "back") == 2
    assert (tmp_path / "back" / "plots" / "loss.png").read_bytes() == b"png"


@pytest.mark.parametrize("key", ["../escape", "/abs/path", "a//b", "a/./b", "a/../b", "", "with space", "a\\b"])
def test_keys_that_could_leave_the_root_are_refused(storage, key):
    with pytest.raises(StorageKeyError):
        storage.put_bytes(key, b"x")
    with pytest.raises(StorageKeyError):
        storage.list(key or "/")


def test_streamed_tar_gz_holds_exactly_the_objects_under_one_root(storage):
    big = os.urandom(3 * 1024 * 1024 + 17)  # several storage chunks, incompressible
    storage.put_bytes("jobs/j/adapter/adapter_model.safetensors", big)
    storage.put_bytes("jobs/j/adapter/README.md", b"# card\n")
    objects = storage.list("jobs/j/adapter/")
    pieces = list(stream_tar_gz(storage, objects, "jobs/j/adapter/", "ftjob-j"))
    assert len(pieces) > 3, "the archive is produced piece by piece, not built in memory first"
    with tarfile.open(fileobj=io.BytesIO(b"".join(pieces)), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"ftjob-j/adapter_model.safetensors", "ftjob-j/README.md"}
        assert all(m.isfile() and m.mode == 0o644 for m in members.values())
        assert tar.extractfile("ftjob-j/adapter_model.safetensors").read() == big
        assert tar.extractfile("ftjob-j/README.md").read() == b"# card\n"
