"""Length generalization: synthetic tasks with known answers (:mod:`.tasks`), training and
answer-token scoring (:mod:`.train`), the sweep over tasks x position encodings x seeds
(:mod:`.experiment`, run by ``benchmarks/bench_length.py``), and per-position loss buckets inside
and beyond the training context (:mod:`.buckets`), and ``tokenbounds length``: loss and bound per
position bucket of any model on its data (:mod:`.positions`)."""

from __future__ import annotations

from .buckets import PositionBuckets, bucket_edges, bucket_losses, bucket_position_totals
from .positions import (
    BucketedState,
    LengthOptions,
    bucket_bounds,
    measure_length,
    position_populations,
)
from .tasks import TASKS, Addition, Copy, Parity, Retrieval, Task, TaskBatch, make_task

__all__ = [
    "TASKS", "Addition", "BucketedState", "Copy", "LengthOptions", "Parity", "PositionBuckets", "Retrieval",
    "Task", "TaskBatch", "bucket_bounds", "bucket_edges", "bucket_losses", "bucket_position_totals", "make_task",
    "measure_length", "position_populations",
]
