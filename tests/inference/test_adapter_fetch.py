"""The inference server finds a job's adapter in the artifact store: in place on local storage, downloaded
once from an S3-compatible bucket (moto's standalone server here), and 404 when the files are gone."""

from __future__ import annotations

from pathlib import Path

import pytest

from citi_service.chat import ChatCompletionRequest
from citi_service.errors import APIError
from citi_service.keys import adapter_prefix
from citi_service.storage import LocalStorage
from tests.inference.conftest import ASK
from tests.service.conftest import moto_s3, s3_storage  # noqa: F401  (moto_s3 is a fixture)


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def service(tmp_path, monkeypatch):
    from worker.inference.app import InferenceService

    monkeypatch.setenv("CITI_INFERENCE_CACHE_DIR", str(tmp_path / "inference-cache"))
    monkeypatch.setenv("CITI_INFERENCE_DEVICE", "cpu")
    return InferenceService()


def test_adapter_is_downloaded_once_from_s3(service, moto_s3, citi_dir):  # noqa: F811
    storage = s3_storage(moto_s3, "citi-inference-fetch")
    keys = storage.upload_dir(citi_dir, adapter_prefix("ftjob-s3"))
    service._storage = storage
    path = service._fetch_adapter({"id": "ft:s3", "job_id": "ftjob-s3"})
    assert _files(path) == sorted(k.removeprefix(adapter_prefix("ftjob-s3")) for k in keys)
    assert path.is_relative_to(service.adapter_root)

    storage.delete_prefix("jobs/ftjob-s3/")  # a second request must not need the bucket any more
    assert service._fetch_adapter({"id": "ft:s3", "job_id": "ftjob-s3"}) == path
    served = service.cache.adapter("ft:s3", path)
    assert served.adapter.kind == "citi"

    with pytest.raises(FileNotFoundError):
        service._fetch_adapter({"id": "ft:gone", "job_id": "ftjob-gone"})
    assert not [p for p in service.adapter_root.iterdir() if p.name.startswith(".fetch-")], "no partial download left"


def test_local_storage_serves_the_adapter_in_place_and_missing_files_are_404(service, tmp_path, citi_dir):
    import asyncio

    storage = LocalStorage(tmp_path / "artifacts")
    storage.upload_dir(citi_dir, adapter_prefix("ftjob-local"))
    service._storage = storage
    path = service._fetch_adapter({"id": "ft:local", "job_id": "ftjob-local"})
    assert path == storage.local_path("jobs/ftjob-local/adapter")

    req = ChatCompletionRequest(model="ft:missing", messages=ASK,
                                citi_adapter={"id": "ft:missing", "job_id": "ftjob-missing"})
    with pytest.raises(APIError) as err:
        asyncio.run(service.served_model(req))
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
