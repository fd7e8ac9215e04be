"""Atomic, self-verifying checkpoints of an evaluation (resume after ``kill -9``).

A checkpoint is one JSON file written as ``tmp -> fsync -> os.replace -> fsync(dir)``, so at any
moment the path holds either the previous complete checkpoint or the new one, never a torn
file. It records a ``config`` dict (everything that determines the result: model and data
hashes, sample seed and positions hash, batch size, block size, alphas, ...) and a sha256 of its
own payload. On load, a payload whose hash does not match is *corrupt*, and a config that differs
from the current run's is *mismatched*: both raise :class:`CheckpointError` naming what differs
(rerun with ``--restart`` to discard it). A checkpoint is never silently used or ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

FORMAT = "tokenbounds.eval-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint exists but is corrupt or belongs to a different run."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (tmp + fsync + os.replace + directory fsync)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass


def save_checkpoint(path: str, config: dict[str, Any], state: dict[str, Any]) -> None:
    payload = {"config": config, "config_sha256": config_hash(config), "state": state}
    body = canonical_json(payload)
    doc = {"format": FORMAT, "payload_sha256": hashlib.sha256(body.encode()).hexdigest(), "payload": payload}
    atomic_write_text(path, json.dumps(doc, allow_nan=True))


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{key}: not in checkpoint, now {new[k]!r}")
            elif k not in new:
                out.append(f"{key}: {old[k]!r} in checkpoint, absent now")
            else:
                out.extend(_diff(old[k], new[k], key))
        return out
    if old != new:
        return [f"{prefix}: checkpoint has {old!r}, this run has {new!r}"]
    return []


def load_checkpoint(path: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state if ``path`` holds a valid checkpoint of this exact config; None if there is
    no checkpoint; raises :class:`CheckpointError` if it is corrupt or from another config."""
    if not os.path.exists(path):
        return None
    hint = "rerun with --restart to discard it (the evaluation starts over)"
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt (unreadable JSON: {exc}); {hint}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "payload" not in doc:
        raise CheckpointError(f"checkpoint {path} is corrupt (not a {FORMAT} file); {hint}")
    body = canonical_json(doc["payload"])
    if hashlib.sha256(body.encode()).hexdigest() != doc.get("payload_sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt (payload sha256 mismatch); {hint}")
    payload = doc["payload"]
    saved = payload.get("config", {})
    if canonical_json(saved) != canonical_json(config):
        diffs = _diff(saved, config)
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run; differences:\n  " + "\n  ".join(diffs[:20])
            + f"\n{hint}, or use another --out directory"
        )
    return payload["state"]
