"""Length generalization: synthetic tasks with known answers (:mod:`.tasks`), training and
answer-token scoring (:mod:`.train`), the sweep over tasks x position encodings x seeds
(:mod:`.experiment`, run by ``benchmarks/bench_length.py``), and per-position loss buckets inside
and beyond the training context (:mod:`.buckets`, for ``tokenbounds length``)."""

from __future__ import annotations

from .buckets import PositionBuckets, bucket_edges, bucket_losses, bucket_position_totals
from .tasks import TASKS, Addition, Copy, Parity, Retrieval, Task, TaskBatch, make_task

__all__ = [
    "TASKS", "Addition", "Copy", "Parity", "PositionBuckets", "Retrieval", "Task", "TaskBatch",
    "bucket_edges", "bucket_losses", "bucket_position_totals", "make_task",
]
