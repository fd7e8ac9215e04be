"""Per-token loss results and the streaming, mergeable statistics built from them.

Losses are in **bits** at every boundary (DESIGN.md "Units are in the names"). Sums over many
tokens are float64 and merged with the pairwise central-moment formulas of Pébay (2008), so two
halves merged equal the whole to ~1e-12 relative and evaluation can shard across processes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_ALPHAS: tuple[float, ...] = (1e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.25, 0.5)
"""Smoothing grid of the official token-bounds code (Lotfi et al. 2024)."""

TOPK: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 50, 100)
"""k values for which LossStats counts top-k correct predictions."""

LN2 = math.log(2.0)


@dataclass(frozen=True)
class TokenLosses:
    """Per-token outputs of :func:`tokenbounds.smoothed_nll`.

    nll_bits: float32 [N, A], -log2((1 - a) p_y + a / V) for each alpha a (0 for ignored rows).
    logp:     float32 [N], natural log p_y (0 for ignored rows).
    rank:     int32 [N], number of logits strictly greater than the target's (ties favour the model).
    valid:    bool [N], False where the target was ignore_index.
    """

    nll_bits: Any
    logp: Any
    rank: Any
    valid: Any
    alphas: tuple[float, ...]
    vocab_size: int

    def __len__(self) -> int:
        return int(self.valid.shape[0])

    def correct_topk(self, k: int):
        """Bool [N]: the target is among the model's top-k (rank < k) and the row is valid."""
        return (self.rank < k) & self.valid


def _central_moments(x: np.ndarray) -> tuple[int, float, float, float, float]:
    """(n, mean, M2, M3, M4) of the columns of x (float64), M_p = sum (x - mean)^p."""
    n = x.shape[0]
    if n == 0:
        z = np.zeros(x.shape[1:])
        return 0, z, z.copy(), z.copy(), z.copy()
    mean = x.mean(axis=0)
    d = x - mean
    d2 = d * d
    return n, mean, d2.sum(axis=0), (d2 * d).sum(axis=0), (d2 * d2).sum(axis=0)


def _merge_moments(a, b):
    """Pairwise merge of (n, mean, M2, M3, M4) (Pébay 2008, eqs. 2.1-2.3; arrays or floats)."""
    na, mean_a, m2a, m3a, m4a = a
    nb, mean_b, m2b, m3b, m4b = b
    if nb == 0:
        return a
    if na == 0:
        return b
    n = na + nb
    delta = mean_b - mean_a
    d_n = delta / n
    mean = mean_a + d_n * nb
    m2 = m2a + m2b + delta * d_n * na * nb
    m3 = m3a + m3b + delta * d_n * d_n * na * nb * (na - nb) + 3.0 * d_n * (na * m2b - nb * m2a)
    m4 = (
        m4a
        + m4b
        + delta * d_n**3 * na * nb * (na * na - na * nb + nb * nb)
        + 6.0 * d_n * d_n * (na * na * m2b + nb * nb * m2a)
        + 4.0 * d_n * (na * m3b - nb * m3a)
    )
    return n, mean, m2, m3, m4


@dataclass
class LossStats:
    """Streaming, mergeable summary of per-token losses.

    Holds, in float64: the token count; per smoothing level the mean and central moments M2, M3,
    M4 of nll_bits (the sum is count * mean); the min and max seen; the same moments for the
    unsmoothed -log2 p_y; and integer top-k correct counts for k in :data:`TOPK`.

    The central moments give sums about any constant c without another pass, e.g.
    sum (X - c)^2 = M2 + n (mean - c)^2, which the empirical Freedman and Bernstein bounds use.
    """

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    vocab_size: int | None = None
    count: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]
    m3: np.ndarray = field(default=None)  # type: ignore[assignment]
    m4: np.ndarray = field(default=None)  # type: ignore[assignment]
    min_bits: np.ndarray = field(default=None)  # type: ignore[assignment]
    max_bits: np.ndarray = field(default=None)  # type: ignore[assignment]
    nll_moments: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    topk_correct: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.alphas = tuple(float(a) for a in self.alphas)
        a = len(self.alphas)
        for name, fill in (("mean", 0.0), ("m2", 0.0), ("m3", 0.0), ("m4", 0.0),
                           ("min_bits", math.inf), ("max_bits", -math.inf)):
            value = getattr(self, name)
            setattr(self, name, np.full(a, fill) if value is None else np.asarray(value, dtype=np.float64))
        self.topk_correct = {int(k): int(v) for k, v in self.topk_correct.items()} or {k: 0 for k in TOPK}

    # ------------------------------------------------------------------ accumulation
    def update(self, losses: TokenLosses) -> LossStats:
        """Add a batch of :class:`TokenLosses` (ignored rows are skipped). Returns self."""
        if tuple(float(a) for a in losses.alphas) != self.alphas:
            raise ValueError(f"TokenLosses alphas {losses.alphas} differ from LossStats alphas {self.alphas}")
        self._check_vocab(losses.vocab_size)
        valid = _to_numpy(losses.valid).astype(bool)
        nll = _to_numpy(losses.nll_bits).astype(np.float64)[valid]
        logp = _to_numpy(losses.logp).astype(np.float64)[valid]
        rank = _to_numpy(losses.rank)[valid]
        other = LossStats(alphas=self.alphas, vocab_size=losses.vocab_size)
        n, mean, m2, m3, m4 = _central_moments(nll.reshape(len(nll), len(self.alphas)))
        other.count, other.mean, other.m2, other.m3, other.m4 = n, mean, m2, m3, m4
        if n:
            other.min_bits = nll.min(axis=0)
            other.max_bits = nll.max(axis=0)
        bits = -logp / LN2
        _, *moments = _central_moments(bits[:, None])
        other.nll_moments = tuple(float(np.asarray(v).reshape(-1)[0]) for v in moments)  # type: ignore[assignment]
        other.topk_correct = {k: int((rank < k).sum()) for k in TOPK}
        return self.merge(other, inplace=True)

    def merge(self, other: LossStats, inplace: bool = False) -> LossStats:
        """Combine two summaries (exact up to float64 rounding). Returns a new object unless inplace."""
        if other.alphas != self.alphas:
            raise ValueError(f"cannot merge LossStats with alphas {other.alphas} into {self.alphas}")
        self._check_vocab(other.vocab_size)
        out = self if inplace else LossStats.from_state_dict(self.state_dict())
        a = (out.count, out.mean, out.m2, out.m3, out.m4)
        b = (other.count, other.mean, other.m2, other.m3, other.m4)
        out.count, out.mean, out.m2, out.m3, out.m4 = _merge_moments(a, b)
        out.min_bits = np.minimum(out.min_bits, other.min_bits)
        out.max_bits = np.maximum(out.max_bits, other.max_bits)
        na, nb = a[0], b[0]
        merged = _merge_moments((na, *self.nll_moments), (nb, *other.nll_moments))
        out.nll_moments = tuple(float(v) for v in merged[1:])  # type: ignore[assignment]
        out.topk_correct = {k: out.topk_correct.get(k, 0) + other.topk_correct.get(k, 0) for k in TOPK}
        out.vocab_size = out.vocab_size or other.vocab_size
        return out

    def all_reduce(self, group=None) -> LossStats:
        """Merge the statistics of every rank of a torch.distributed group (in rank order, so every
        rank gets bit-identical results). Returns a new object; self is unchanged."""
        import torch.distributed as dist

        states: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, self.state_dict(), group=group)
        out = LossStats(alphas=self.alphas, vocab_size=self.vocab_size)
        for state in states:
            out.merge(LossStats.from_state_dict(state), inplace=True)
        return out

    def _check_vocab(self, vocab_size: int | None) -> None:
        if vocab_size is not None and self.vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(f"vocab_size mismatch: {vocab_size} vs {self.vocab_size}")
        if self.vocab_size is None:
            self.vocab_size = vocab_size

    # ------------------------------------------------------------------ derived quantities
    @property
    def sum_bits(self) -> np.ndarray:
        """Per-alpha float64 sum of nll_bits."""
        return self.count * self.mean

    @property
    def mean_bits(self) -> dict[float, float]:
        """{alpha: mean smoothed loss in bits} — the input token_bound expects."""
        return {a: float(m) for a, m in zip(self.alphas, self.mean, strict=True)}

    @property
    def variance_bits(self) -> np.ndarray:
        """Per-alpha unbiased sample variance of nll_bits (NaN when count < 2)."""
        return self.m2 / (self.count - 1) if self.count > 1 else np.full(len(self.alphas), math.nan)

    @property
    def mean_nll_bits(self) -> float:
        """Mean unsmoothed loss -log2 p_y in bits (inf if some p_y underflowed to 0)."""
        return self.nll_moments[0]

    def topk_error(self, k: int) -> float:
        """Empirical top-k error rate."""
        if k not in self.topk_correct:
            raise ValueError(f"k={k} not tracked; LossStats tracks k in {TOPK}")
        return 1.0 - self.topk_correct[k] / self.count if self.count else math.nan

    def sum_sq_about(self, center: float | np.ndarray) -> np.ndarray:
        """Per-alpha sum of (nll_bits - center)^2 = M2 + n (mean - center)^2."""
        d = self.mean - np.asarray(center, dtype=np.float64)
        return self.m2 + self.count * d * d

    def sum_pow4_about(self, center: float | np.ndarray) -> np.ndarray:
        """Per-alpha sum of (nll_bits - center)^4 from the central moments."""
        d = self.mean - np.asarray(center, dtype=np.float64)
        return self.m4 + 4 * d * self.m3 + 6 * d * d * self.m2 + self.count * d**4

    # ------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (floats are exact: Python floats round-trip through json)."""
        return {
            "format": "tokenbounds.LossStats/1",
            "alphas": list(self.alphas),
            "vocab_size": self.vocab_size,
            "count": int(self.count),
            "mean": [float(v) for v in self.mean],
            "m2": [float(v) for v in self.m2],
            "m3": [float(v) for v in self.m3],
            "m4": [float(v) for v in self.m4],
            "min_bits": [float(v) for v in self.min_bits],
            "max_bits": [float(v) for v in self.max_bits],
            "nll_moments": [float(v) for v in self.nll_moments],
            "topk_correct": {str(k): int(v) for k, v in self.topk_correct.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LossStats:
        if state.get("format") != "tokenbounds.LossStats/1":
            raise ValueError(f"not a LossStats state (format={state.get('format')!r})")
        return cls(
            alphas=tuple(state["alphas"]),
            vocab_size=state["vocab_size"],
            count=int(state["count"]),
            mean=np.array(state["mean"], dtype=np.float64),
            m2=np.array(state["m2"], dtype=np.float64),
            m3=np.array(state["m3"], dtype=np.float64),
            m4=np.array(state["m4"], dtype=np.float64),
            min_bits=np.array(state["min_bits"], dtype=np.float64),
            max_bits=np.array(state["max_bits"], dtype=np.float64),
            nll_moments=tuple(state["nll_moments"]),
            topk_correct={int(k): int(v) for k, v in state["topk_correct"].items()},
        )

    def to_json(self) -> str:
        return json.dumps(self.state_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LossStats:
        return cls.from_state_dict(json.loads(text))


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)
