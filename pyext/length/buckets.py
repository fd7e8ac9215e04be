"""Losses grouped by position, inside and beyond the training context (for ``tokenbounds length``).

A scored token's *position* is its context length c: the number of tokens the model reads before
predicting it, 1..L. A model trained on inputs of ``context_length`` T has seen c <= T only;
buckets never straddle T (T + 1 is always an edge), so every bucket is either inside or beyond
the training context. Pure numpy; no torch.

Each bucket b keeps its exact population m_b, the sum and the sum of squares of the losses
(bits), so a per-bucket bound (spec/bounds.md: token-level or Freedman) can use m_b, and the
populations sum to m, the number of tokens given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def bucket_edges(max_length: int, context_length: int | None = None, num_buckets: int = 32) -> np.ndarray:
    """Edges ``[1 = e_0 < e_1 < ... < e_K = L + 1]``: bucket b holds positions e_b <= c < e_{b+1}.

    One bucket per position when L <= num_buckets, else geometric (``round(geomspace(1, L + 1,
    num_buckets + 1))``, the rule of tokenbounds.eval's context-length buckets); T + 1 is added
    as an edge when 1 <= T < L so no bucket mixes seen and unseen lengths.
    """
    if isinstance(max_length, bool) or int(max_length) != max_length or max_length < 1:
        raise ValueError(f"max_length must be an integer >= 1 (the longest context scored), got {max_length!r}")
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    L = int(max_length)
    if L <= num_buckets:
        edges = np.arange(1, L + 2, dtype=np.int64)
    else:
        edges = np.unique(np.round(np.geomspace(1, L + 1, num_buckets + 1)).astype(np.int64))
    if context_length is not None:
        if int(context_length) != context_length or context_length < 1:
            raise ValueError(f"context_length (the training length T) must be an integer >= 1, got {context_length!r}")
        if context_length < L:
            edges = np.union1d(edges, [int(context_length) + 1])
    return edges


@dataclass(frozen=True)
class PositionBuckets:
    """Per-bucket populations and loss sums; ``counts.sum() == m``."""

    edges: np.ndarray  # [K + 1] int64
    counts: np.ndarray  # [K] int64: m_b
    loss_sum_bits: np.ndarray  # [K] or [K, A] float64
    loss_sq_sum_bits: np.ndarray  # like loss_sum_bits: sums of squared losses (for Freedman)
    context_length: int | None  # training length T, or None when unknown

    @property
    def m(self) -> int:
        return int(self.counts.sum())

    @property
    def mean_bits(self) -> np.ndarray:
        """Mean loss per bucket (NaN for an empty bucket)."""
        n = self.counts.reshape((-1,) + (1,) * (self.loss_sum_bits.ndim - 1))
        return np.where(n > 0, self.loss_sum_bits / np.maximum(n, 1), np.nan)

    @property
    def beyond_training(self) -> np.ndarray:
        """True for buckets whose positions all exceed T."""
        if self.context_length is None:
            return np.zeros(len(self.counts), dtype=bool)
        return self.edges[:-1] > self.context_length

    def to_dict(self) -> dict[str, Any]:
        return {
            "edges": self.edges.tolist(), "counts": self.counts.tolist(), "m": self.m,
            "loss_sum_bits": self.loss_sum_bits.tolist(), "loss_sq_sum_bits": self.loss_sq_sum_bits.tolist(),
            "mean_bits": np.where(np.isnan(self.mean_bits), None, self.mean_bits).tolist(),
            "beyond_training": self.beyond_training.tolist(), "context_length": self.context_length,
        }


def bucket_position_totals(
    counts: np.ndarray,
    loss_sum_bits: np.ndarray,
    loss_sq_sum_bits: np.ndarray | None = None,
    *,
    context_length: int | None = None,
    num_buckets: int = 32,
) -> PositionBuckets:
    """Group per-position totals into :func:`bucket_edges` buckets: row c - 1 holds position
    c = 1..L (L = len(counts)), the form an evaluation engine that accumulates per position
    returns. ``loss_sum_bits`` may be [L] or [L, A] (one column per smoothing level); without
    squared sums the buckets' ``loss_sq_sum_bits`` are NaN."""
    counts = np.asarray(counts)
    sums = np.asarray(loss_sum_bits, dtype=np.float64)
    if counts.ndim != 1 or sums.ndim not in (1, 2) or sums.shape[0] != counts.shape[0]:
        raise ValueError(f"counts must be [L] and loss_sum_bits [L] or [L, A] (positions 1..L), "
                         f"got shapes {counts.shape} and {sums.shape}")
    if len(counts) < 1:
        raise ValueError("max_length must be >= 1: got no positions")
    if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ValueError("counts must be non-negative integers")
    sq = np.full_like(sums, np.nan) if loss_sq_sum_bits is None else np.asarray(loss_sq_sum_bits, dtype=np.float64)
    if sq.shape != sums.shape:
        raise ValueError(f"loss_sq_sum_bits has shape {sq.shape}, expected {sums.shape} (that of loss_sum_bits)")
    edges = bucket_edges(len(counts), context_length, num_buckets)
    starts = edges[:-1] - 1  # row of each bucket's first position
    return PositionBuckets(
        edges=edges,
        counts=np.add.reduceat(counts.astype(np.int64), starts),
        loss_sum_bits=np.add.reduceat(sums, starts, axis=0),
        loss_sq_sum_bits=np.add.reduceat(sq, starts, axis=0),
        context_length=None if context_length is None else int(context_length),
    )


def bucket_losses(
    positions: np.ndarray,
    losses_bits: np.ndarray,
    max_length: int,
    *,
    context_length: int | None = None,
    num_buckets: int = 32,
) -> PositionBuckets:
    """Group m per-token losses (bits) by position (context length, 1..``max_length``).

    Every token lands in exactly one bucket, so the populations sum to m; a position outside
    1..L or a non-finite loss is an error, never silently dropped.
    """
    if isinstance(max_length, bool) or int(max_length) != max_length or max_length < 1:
        raise ValueError(f"max_length must be an integer >= 1 (the longest context scored), got {max_length!r}")
    pos = np.asarray(positions)
    loss = np.asarray(losses_bits, dtype=np.float64)
    if pos.shape != loss.shape or pos.ndim != 1:
        raise ValueError(f"positions and losses_bits must be 1-D of equal length, got shapes {pos.shape} and {loss.shape}")
    if pos.size and not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"positions must be integers (context lengths), got dtype {pos.dtype}")
    if pos.size and (pos.min() < 1 or pos.max() > max_length):
        bad = pos[(pos < 1) | (pos > max_length)][0]
        raise ValueError(f"position {bad} is outside 1..max_length={max_length}; positions are context "
                         "lengths (tokens read before the scored one); raise max_length to include it")
    if not np.isfinite(loss).all():
        raise ValueError("losses_bits contains NaN or inf; smooth the predictions (alpha > 0) or drop those tokens first")
    L = int(max_length)
    idx = pos.astype(np.int64) - 1
    return bucket_position_totals(
        np.bincount(idx, minlength=L), np.bincount(idx, weights=loss, minlength=L),
        np.bincount(idx, weights=loss * loss, minlength=L), context_length=context_length, num_buckets=num_buckets,
    )
