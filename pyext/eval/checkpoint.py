"""Atomic, self-verifying checkpoints of an evaluation (resume after ``kill -9``).

An evaluation's plan is cut into *blocks* of consecutive batches, fixed by the plan,
``--batch-size`` and ``--checkpoint-every`` (not by the number of processes). The checkpoint is a
directory ``OUT/checkpoint/``:

* ``manifest.json``: the run's ``config`` (everything that determines the statistics: model and
  data hashes, context rule, sample digest, batch and block sizes, alphas, ...) and its sha256,
  written once by rank 0;
* ``block-<j>.json``: the statistics of block j, written once, atomically
  (:func:`tokenbounds.eval.fileio.atomic_write_text`), with the config's sha256 and a sha256 of
  its own payload.

Each block is written once, so a checkpoint costs O(1) per block however long the run, and a
run resumed with another number of processes reuses every finished block. On load a file whose
hash does not match is *corrupt* and a config that differs from this run's is *mismatched*: both
raise :class:`CheckpointError` naming what differs (rerun with ``--restart`` to discard it). A
checkpoint is never silently used or ignored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from .fileio import atomic_write_text, canonical_json, json_sha256

FORMAT = "tokenbounds.eval-checkpoint/2"
HINT = "rerun with --restart to discard it (the evaluation starts over)"

__all__ = ["FORMAT", "BlockStore", "CheckpointError", "config_hash"]


class CheckpointError(RuntimeError):
    """A checkpoint exists but is corrupt or belongs to a different run."""


def config_hash(config: dict[str, Any]) -> str:
    return json_sha256(config)


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


def _read(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {what} {path} is corrupt (unreadable JSON: {exc}); {HINT}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "payload" not in doc:
        raise CheckpointError(f"checkpoint {what} {path} is corrupt (not a {FORMAT} file); {HINT}")
    if json_sha256(doc["payload"]) != doc.get("payload_sha256"):
        raise CheckpointError(f"checkpoint {what} {path} is corrupt (payload sha256 mismatch); {HINT}")
    return doc["payload"]


def _write(path: str, payload: dict[str, Any]) -> None:
    doc = {"format": FORMAT, "payload_sha256": json_sha256(payload), "payload": payload}
    atomic_write_text(path, json.dumps(doc, allow_nan=True))


class BlockStore:
    """The checkpoint directory of one run (see the module docstring)."""

    def __init__(self, out: str, config: dict[str, Any]):
        self.directory = os.path.join(out, "checkpoint")
        self.manifest = os.path.join(self.directory, "manifest.json")
        self.config = config
        self.config_sha256 = config_hash(config)

    def discard(self) -> bool:
        """Delete the checkpoint (``--restart``); True if there was one."""
        if os.path.isdir(self.directory):
            shutil.rmtree(self.directory)
            return True
        return False

    def open(self, *, create: bool) -> None:
        """Check the manifest against this run's config (raise :class:`CheckpointError` on a
        mismatch or corruption); write it when absent and ``create`` (rank 0)."""
        if os.path.exists(self.manifest):
            saved = _read(self.manifest, "manifest").get("config", {})
            if canonical_json(saved) != canonical_json(self.config):
                diffs = _diff(saved, self.config)
                raise CheckpointError(
                    f"checkpoint {self.directory} belongs to a different run; differences:\n  "
                    + "\n  ".join(diffs[:20]) + f"\n{HINT}, or use another --out directory")
        elif create:
            os.makedirs(self.directory, exist_ok=True)
            _write(self.manifest, {"config": self.config, "config_sha256": self.config_sha256})

    def path(self, block: int) -> str:
        return os.path.join(self.directory, f"block-{block:08d}.json")

    def done(self) -> list[int]:
        """Blocks with a file (not yet verified)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(m.group(1)) for name in os.listdir(self.directory)
                      if (m := re.fullmatch(r"block-(\d+)\.json", name)))

    def load(self, block: int) -> dict[str, Any] | None:
        """Block ``block``'s saved state, None if it has none; corrupt or foreign: raises."""
        path = self.path(block)
        if not os.path.exists(path):
            return None
        payload = _read(path, "block")
        if payload.get("config_sha256") != self.config_sha256 or payload.get("block") != block:
            raise CheckpointError(f"checkpoint block {path} belongs to a different run; {HINT}")
        return payload["state"]

    def save(self, block: int, state: dict[str, Any]) -> None:
        _write(self.path(block), {"block": block, "config_sha256": self.config_sha256, "state": state})
