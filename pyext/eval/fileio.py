"""Atomic writes, JSON and hashing: the one helper module the evaluation code (and the demo,
the corpus builder, the checkpoints) writes files through.

Atomic write: the content goes to ``PATH.tmp.<pid>``, is flushed and fsync'ed, then
``os.replace``'d over ``PATH`` and the directory is fsync'ed, so a reader (or a run resumed after
``kill -9``) sees the old complete file or the new complete file, never a torn one.

Hashes are sha256 hex digests. :func:`canonical_json` (sorted keys, no spaces, NaN allowed) makes
the hash of a JSON-able object independent of dict order; :func:`file_digest` hashes a file in
4 MiB chunks, or fingerprints files above ``HASH_FULL_LIMIT_BYTES`` by their first and last
64 MiB plus their size (and says so in ``method``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = [
    "HASH_FULL_LIMIT_BYTES",
    "arrays_sha256",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "canonical_json",
    "file_digest",
    "file_sha256",
    "json_sha256",
    "read_json",
    "short_hash",
]

HASH_FULL_LIMIT_BYTES = 4 << 30
"""Files larger than this are fingerprinted (size + first/last 64 MiB), not hashed in full."""


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s new content to (by any writer: ``torch.save``,
    ``ndarray.tofile``, ...); on success it is fsync'ed and atomically renamed over ``path``, on
    an exception it is removed and ``path`` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any, *, indent: int | None = 1) -> None:
    """``json.dumps(obj)`` to ``path`` atomically (NaN/inf allowed; numpy scalars become floats)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal objects give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True, default=_json_default)


def json_sha256(obj: Any) -> str:
    """sha256 of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def short_hash(obj: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of :func:`json_sha256` (cache keys, directory names)."""
    return json_sha256(obj)[:length]


def arrays_sha256(*arrays: Any) -> str:
    """sha256 of integer arrays as little-endian int64, in order (records which positions or
    units were evaluated)."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
    return h.hexdigest()


def file_digest(path: str, limit: int = HASH_FULL_LIMIT_BYTES) -> dict[str, Any]:
    """``{"sha256", "bytes", "method"}`` of a file: the full sha256 up to ``limit`` bytes, else a
    fingerprint of its size and first and last 64 MiB."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= limit:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
            return {"sha256": h.hexdigest(), "bytes": size, "method": "sha256"}
        part = 64 << 20
        h.update(f.read(part))
        f.seek(size - part)
        h.update(f.read(part))
        h.update(str(size).encode())
        return {"sha256": h.hexdigest(), "bytes": size, "method": "sha256(first 64MiB + last 64MiB + size)"}


def file_sha256(path: str) -> str:
    """The full sha256 hex digest of a file."""
    return file_digest(path, limit=1 << 62)["sha256"]
