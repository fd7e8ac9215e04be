"""Per-token and per-unit accumulators of an evaluation, mergeable in a fixed order.

:class:`EvalState` holds, for the scored targets of a block of batches,

* ``stats``: :class:`tokenbounds.LossStats` of every scored token **with multiplicity** (a unit
  drawn r times contributes its tokens r times, so in a sampled mode its count is the number of
  drawn tokens and in a full pass it is exactly m);
* ``units``: :class:`tokenbounds.UnitStats`, the per-draw power sums of the unit means, in the
  window-unit sampled mode only (cluster sampling, ``spec/bounds.md`` section 3b);
* a fixed-bin histogram of the unsmoothed loss -log2 p_y (integer counts, exact under merging);
* per context-length bucket (data tokens before the target), the count and float64 sums of the
  smoothed losses, of their squares and of the unsmoothed loss: the loss by position, and in a
  full pass the exact per-bucket statistics of its bounds.

Everything is a float64 / integer sum or a Pébay moment merge, so the state of a block depends
only on its batches and blocks merged in block order give the same bits in every run (resume,
any number of processes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..losses import LN2, LossStats, TokenLosses, UnitStats, _to_numpy

__all__ = ["HIST_BINS", "HIST_MAX_BITS", "POS_BUCKETS", "EvalState", "losses_to_numpy", "position_edges"]

HIST_MAX_BITS = 40.0
HIST_BINS = 160
"""The loss histogram has HIST_BINS bins of width HIST_MAX_BITS / HIST_BINS over [0, 40) bits,
plus one overflow bin (losses >= 40 bits or infinite)."""
POS_BUCKETS = 32


def position_edges(window: int, buckets: int = POS_BUCKETS) -> np.ndarray:
    """Bucket edges over context lengths 1..T: [e_0=1, e_1, ..., e_n=T+1) (geometric when T > buckets)."""
    if window <= buckets:
        return np.arange(1, window + 2, dtype=np.int64)
    return np.unique(np.round(np.geomspace(1, window + 1, buckets + 1)).astype(np.int64))


def losses_to_numpy(losses: TokenLosses) -> TokenLosses:
    """The same losses as numpy arrays (one device-to-host copy per batch)."""
    return TokenLosses(_to_numpy(losses.nll_bits), _to_numpy(losses.logp), _to_numpy(losses.rank),
                       _to_numpy(losses.valid).astype(bool), tuple(losses.alphas), losses.vocab_size)


def _take(losses: TokenLosses, idx: np.ndarray) -> TokenLosses:
    return TokenLosses(losses.nll_bits[idx], losses.logp[idx], losses.rank[idx], losses.valid[idx],
                       losses.alphas, losses.vocab_size)


@dataclass
class EvalState:
    """Mergeable statistics of scored targets (see the module docstring)."""

    stats: LossStats
    units: UnitStats | None
    edges: np.ndarray
    hist: np.ndarray
    pos_count: np.ndarray
    pos_sum_bits: np.ndarray
    pos_sumsq_bits: np.ndarray
    pos_nll_sum_bits: np.ndarray

    @classmethod
    def empty(cls, alphas, vocab_size: int, window: int, *, track_units: bool) -> EvalState:
        alphas = tuple(float(a) for a in alphas)
        edges = position_edges(window)
        nb, na = len(edges) - 1, len(alphas)
        return cls(LossStats(alphas=alphas, vocab_size=vocab_size),
                   UnitStats(alphas=alphas, vocab_size=vocab_size) if track_units else None,
                   edges, np.zeros(HIST_BINS + 1, np.int64), np.zeros(nb, np.int64), np.zeros((nb, na)),
                   np.zeros((nb, na)), np.zeros(nb))

    def update(self, losses: TokenLosses, context_lengths: np.ndarray, unit_index: np.ndarray,
               unit_weights: np.ndarray) -> EvalState:
        """Add a batch: row i of ``losses`` (numpy, :func:`losses_to_numpy`) is a target with
        ``context_lengths[i]`` data tokens before it, of the batch's unit ``unit_index[i]``, which
        was drawn ``unit_weights[unit_index[i]]`` times."""
        unit_index = np.asarray(unit_index, dtype=np.int64)
        unit_weights = np.asarray(unit_weights, dtype=np.int64)
        w = unit_weights[unit_index]
        if np.all(w == 1):
            self.stats.update(losses)
        else:
            self.stats.update(_take(losses, np.repeat(np.arange(w.size), w)))
        if self.units is not None:
            self.units.update(losses, unit_index, weights=unit_weights)
        valid = np.asarray(losses.valid, dtype=bool)
        wv = w[valid].astype(np.float64)
        nll = np.asarray(losses.nll_bits, dtype=np.float64)[valid]
        bits = -np.asarray(losses.logp, dtype=np.float64)[valid] / LN2
        width = HIST_MAX_BITS / HIST_BINS
        with np.errstate(invalid="ignore"):
            idx = np.where(np.isfinite(bits) & (bits < HIST_MAX_BITS), np.floor(np.maximum(bits, 0) / width), HIST_BINS)
        self.hist += np.bincount(idx.astype(np.int64), weights=wv, minlength=HIST_BINS + 1).astype(np.int64)
        b = np.searchsorted(self.edges, np.asarray(context_lengths)[valid], side="right") - 1
        nb = len(self.edges) - 1
        self.pos_count += np.bincount(b, weights=wv, minlength=nb).astype(np.int64)
        for j in range(nll.shape[1]):
            self.pos_sum_bits[:, j] += np.bincount(b, weights=wv * nll[:, j], minlength=nb)
            self.pos_sumsq_bits[:, j] += np.bincount(b, weights=wv * nll[:, j] ** 2, minlength=nb)
        self.pos_nll_sum_bits += np.bincount(b, weights=wv * bits, minlength=nb)
        return self

    def merge(self, other: EvalState) -> EvalState:
        """In place: self followed by other (the order matters only at float rounding)."""
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("cannot merge EvalStates with different context-length buckets")
        if (self.units is None) != (other.units is None):
            raise ValueError("cannot merge an EvalState with unit statistics into one without")
        self.stats.merge(other.stats, inplace=True)
        if self.units is not None:
            self.units.merge(other.units, inplace=True)
        self.hist += other.hist
        self.pos_count += other.pos_count
        self.pos_sum_bits += other.pos_sum_bits
        self.pos_sumsq_bits += other.pos_sumsq_bits
        self.pos_nll_sum_bits += other.pos_nll_sum_bits
        return self

    # ------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Any]:
        return {"loss_stats": self.stats.state_dict(),
                "unit_stats": None if self.units is None else self.units.state_dict(),
                "edges": self.edges.tolist(), "hist": self.hist.tolist(), "pos_count": self.pos_count.tolist(),
                "pos_sum_bits": self.pos_sum_bits.tolist(), "pos_sumsq_bits": self.pos_sumsq_bits.tolist(),
                "pos_nll_sum_bits": self.pos_nll_sum_bits.tolist()}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> EvalState:
        na = len(d["loss_stats"]["alphas"])
        return cls(LossStats.from_state_dict(d["loss_stats"]),
                   None if d.get("unit_stats") is None else UnitStats.from_state_dict(d["unit_stats"]),
                   np.array(d["edges"], dtype=np.int64), np.array(d["hist"], dtype=np.int64),
                   np.array(d["pos_count"], dtype=np.int64),
                   np.array(d["pos_sum_bits"], dtype=np.float64).reshape(-1, na),
                   np.array(d["pos_sumsq_bits"], dtype=np.float64).reshape(-1, na),
                   np.array(d["pos_nll_sum_bits"], dtype=np.float64))

    # ------------------------------------------------------------------ summaries
    def histogram_dict(self) -> dict[str, Any]:
        return {"quantity": "unsmoothed loss -log2 p_y (bits)", "bin_width_bits": HIST_MAX_BITS / HIST_BINS,
                "range_bits": [0.0, HIST_MAX_BITS], "counts": self.hist[:-1].tolist(),
                "overflow": int(self.hist[-1])}

    def by_context_length(self) -> dict[str, Any]:
        """Per bucket of context length: count, mean and unbiased variance of each smoothed
        loss, mean unsmoothed loss (None where a bucket is empty)."""
        def clean(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        n = self.pos_count.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.pos_sum_bits / n[:, None]
            var = (self.pos_sumsq_bits - n[:, None] * mean * mean) / (n[:, None] - 1)
            nll = self.pos_nll_sum_bits / n
        var = np.where(np.isfinite(var), np.maximum(var, 0.0), np.nan)
        return {"context_tokens_from": self.edges[:-1].tolist(), "context_tokens_to": (self.edges[1:] - 1).tolist(),
                "count": self.pos_count.tolist(), "alphas": list(self.stats.alphas),
                "mean_bits": [[clean(v) for v in row] for row in mean],
                "variance_bits": [[clean(v) for v in row] for row in var],
                "mean_nll_bits": [clean(v) for v in nll]}
