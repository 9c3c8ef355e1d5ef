"""Stream a ``.tar.gz`` of stored objects without holding any file in memory or on disk.

Each member is a tar header, the object's bytes as they come from storage, and padding to 512 bytes;
the whole stream goes through one gzip compressor. Names are rebuilt from checked storage keys, so no
member can point outside the archive's root.
"""

from __future__ import annotations

import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator

from citi_service.storage import Storage, StoredObject

_BLOCK = 512


def stream_tar_gz(storage: Storage, objects: Iterable[StoredObject], strip_prefix: str, root: str) -> Iterator[bytes]:
    """Yield gzip-compressed tar bytes holding ``objects``, each named ``root/<key minus strip_prefix>``."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: gzip framing
    now = int(time.time())

    def pack(data: bytes) -> bytes:
        return compressor.compress(data)

    for obj in objects:
        info = tarfile.TarInfo(f"{root}/{obj.key[len(strip_prefix):]}")
        info.size = obj.size
        info.mtime = now
        info.mode = 0o644
        info.type = tarfile.REGTYPE
        if out := pack(info.tobuf(format=tarfile.PAX_FORMAT)):
            yield out
        sent = 0
        for chunk in storage.iter_bytes(obj.key):
            sent += len(chunk)
            if sent > obj.size:
                raise RuntimeError(f"{obj.key} grew while it was being archived")
            if out := pack(chunk):
                yield out
        if sent != obj.size:
            raise RuntimeError(f"{obj.key} changed size while it was being archived")
        if out := pack(b"\0" * (-obj.size % _BLOCK)):
            yield out
    yield pack(b"\0" * (2 * _BLOCK)) + compressor.flush()
