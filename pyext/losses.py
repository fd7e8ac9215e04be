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


UNIT_STATS_FORMAT = "tokenbounds.UnitStats/1"


@dataclass
class UnitStats:
    """Power sums over the draws of a window-unit (cluster) sample (``spec/bounds.md`` section 3b).

    A draw picks one of the m data points uniformly at random; its unit u (the n_u targets one
    window scores) contributes, per smoothing level, the unit means
    ``y_u = (1/n_u) sum_{k in u} l_k`` and ``q_u = (1/n_u) sum_{k in u} l_k^2`` of the smoothed loss
    in bits (unshifted), the unit mean of the unsmoothed loss and of each top-k error. A unit is
    drawn with probability n_u / m, so E[y] = Rhat_m: the draws' y are i.i.d. in the loss interval
    and Hoeffding / empirical Bernstein apply with s = ``draws``. For any centering c (bits),
    ``W(c) = q - 2 c y + c^2`` is the unit mean of (l - c)^2, i.i.d. with mean
    (1/m) sum_k (l_k - c)^2, which the Freedman bound needs; its mean and variance over the draws
    follow from the power sums of y and q kept here (:meth:`sq_about`).

    A unit drawn r times is scored once and counted r times (``weights``). Everything is a float64
    sum, so merging is addition (bit-identical for a fixed merge order) and evaluation can shard.
    """

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    vocab_size: int | None = None
    draws: int = 0
    tokens: int = 0
    sum_y: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_yy: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_q: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_qq: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_yq: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_nll: float = 0.0
    sum_nll_sq: float = 0.0
    topk_err_sum: dict[int, float] = field(default_factory=dict)
    topk_err_sumsq: dict[int, float] = field(default_factory=dict)

    _ARRAYS = ("sum_y", "sum_yy", "sum_q", "sum_qq", "sum_yq")

    def __post_init__(self) -> None:
        self.alphas = tuple(float(a) for a in self.alphas)
        for name in self._ARRAYS:
            value = getattr(self, name)
            setattr(self, name, np.zeros(len(self.alphas)) if value is None
                    else np.asarray(value, dtype=np.float64).copy())
        self.topk_err_sum = {int(k): float(self.topk_err_sum.get(k, 0.0)) for k in TOPK}
        self.topk_err_sumsq = {int(k): float(self.topk_err_sumsq.get(k, 0.0)) for k in TOPK}

    # ------------------------------------------------------------------ accumulation
    def update_units(self, counts, sum_bits, sum_sq_bits, nll_sum_bits, topk_correct, weights=None) -> UnitStats:
        """Add U units given their per-unit sums. ``counts`` [U] scored tokens n_u >= 1;
        ``sum_bits`` / ``sum_sq_bits`` [U, A] sums of l and l^2 over the unit's tokens;
        ``nll_sum_bits`` [U] sum of the unsmoothed -log2 p_y; ``topk_correct`` [U, len(TOPK)]
        counts of tokens with rank < k; ``weights`` [U] draws of each unit (default 1 each)."""
        n = np.asarray(counts, dtype=np.float64).reshape(-1)
        u = n.size
        a = len(self.alphas)
        sb = np.asarray(sum_bits, dtype=np.float64).reshape(u, a)
        sq = np.asarray(sum_sq_bits, dtype=np.float64).reshape(u, a)
        nll = np.asarray(nll_sum_bits, dtype=np.float64).reshape(u)
        tk = np.asarray(topk_correct, dtype=np.float64).reshape(u, len(TOPK))
        w = np.ones(u) if weights is None else np.asarray(weights, dtype=np.float64).reshape(u)
        if u == 0:
            return self
        if np.any(n < 1):
            raise ValueError("every unit needs at least one scored token (counts >= 1)")
        if np.any(w < 0) or np.any(w != np.round(w)):
            raise ValueError("unit weights (draw multiplicities) must be non-negative integers")
        y = sb / n[:, None]
        q = sq / n[:, None]
        wc = w[:, None]
        self.draws += int(w.sum())
        self.tokens += int((w * n).sum())
        self.sum_y += (wc * y).sum(axis=0)
        self.sum_yy += (wc * y * y).sum(axis=0)
        self.sum_q += (wc * q).sum(axis=0)
        self.sum_qq += (wc * q * q).sum(axis=0)
        self.sum_yq += (wc * y * q).sum(axis=0)
        e = nll / n
        self.sum_nll += float((w * e).sum())
        self.sum_nll_sq += float((w * e * e).sum())
        for j, k in enumerate(TOPK):
            err = 1.0 - tk[:, j] / n
            self.topk_err_sum[k] += float((w * err).sum())
            self.topk_err_sumsq[k] += float((w * err * err).sum())
        return self

    def update(self, losses: TokenLosses, unit_index, weights=None) -> UnitStats:
        """Add the units of a batch of :class:`TokenLosses`: row i belongs to local unit
        ``unit_index[i]`` in 0..U-1 (ignored rows are skipped); ``weights`` [U] as in
        :meth:`update_units`. Units whose rows are all ignored are an error."""
        if tuple(float(a) for a in losses.alphas) != self.alphas:
            raise ValueError(f"TokenLosses alphas {losses.alphas} differ from UnitStats alphas {self.alphas}")
        self._check_vocab(losses.vocab_size)
        valid = _to_numpy(losses.valid).astype(bool)
        idx = np.asarray(_to_numpy(unit_index), dtype=np.int64).reshape(-1)
        if idx.shape[0] != valid.shape[0]:
            raise ValueError(f"unit_index has {idx.shape[0]} entries for {valid.shape[0]} loss rows")
        u = int(idx.max()) + 1 if idx.size else 0
        if weights is not None:
            u = max(u, int(np.asarray(weights).reshape(-1).size))
        nll = _to_numpy(losses.nll_bits).astype(np.float64)[valid]
        bits = -_to_numpy(losses.logp).astype(np.float64)[valid] / LN2
        rank = _to_numpy(losses.rank)[valid]
        iv = idx[valid]
        counts = np.bincount(iv, minlength=u)
        a = len(self.alphas)
        sb = np.stack([np.bincount(iv, weights=nll[:, j], minlength=u) for j in range(a)], axis=1)
        sq = np.stack([np.bincount(iv, weights=nll[:, j] ** 2, minlength=u) for j in range(a)], axis=1)
        sn = np.bincount(iv, weights=bits, minlength=u)
        tk = np.stack([np.bincount(iv, weights=(rank < k).astype(np.float64), minlength=u) for k in TOPK], axis=1)
        return self.update_units(counts, sb, sq, sn, tk, weights)

    def merge(self, other: UnitStats, inplace: bool = False) -> UnitStats:
        """Add another sample's draws (float64 addition). Returns a new object unless inplace."""
        if other.alphas != self.alphas:
            raise ValueError(f"cannot merge UnitStats with alphas {other.alphas} into {self.alphas}")
        self._check_vocab(other.vocab_size)
        out = self if inplace else UnitStats.from_state_dict(self.state_dict())
        out.draws += other.draws
        out.tokens += other.tokens
        for name in self._ARRAYS:
            setattr(out, name, getattr(out, name) + getattr(other, name))
        out.sum_nll += other.sum_nll
        out.sum_nll_sq += other.sum_nll_sq
        for k in TOPK:
            out.topk_err_sum[k] += other.topk_err_sum[k]
            out.topk_err_sumsq[k] += other.topk_err_sumsq[k]
        out.vocab_size = out.vocab_size or other.vocab_size
        return out

    def _check_vocab(self, vocab_size: int | None) -> None:
        if vocab_size is not None and self.vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(f"vocab_size mismatch: {vocab_size} vs {self.vocab_size}")
        if self.vocab_size is None:
            self.vocab_size = vocab_size

    # ------------------------------------------------------------------ derived quantities
    @staticmethod
    def _mean_var(s1, s2, n: int):
        """Mean and unbiased variance from power sums (variance NaN when n < 2, clipped at 0)."""
        mean = np.asarray(s1, dtype=np.float64) / n if n else np.full(np.shape(s1), math.nan)
        if n < 2:
            return mean, np.full(np.shape(s1), math.nan)
        var = (np.asarray(s2, dtype=np.float64) - n * mean * mean) / (n - 1)
        return mean, np.maximum(var, 0.0)

    @property
    def mean_bits(self) -> dict[float, float]:
        """{alpha: mean over draws of the unit mean loss}: an unbiased estimate of Rhat_m."""
        mean, _ = self._mean_var(self.sum_y, self.sum_yy, self.draws)
        return {a: float(v) for a, v in zip(self.alphas, mean, strict=True)}

    @property
    def variance_bits(self) -> np.ndarray:
        """Per-alpha unbiased sample variance of the unit means over the draws (bits^2)."""
        return self._mean_var(self.sum_y, self.sum_yy, self.draws)[1]

    @property
    def mean_nll_bits(self) -> float:
        return self.sum_nll / self.draws if self.draws else math.nan

    def topk_error(self, k: int) -> float:
        """Mean over draws of the unit's top-k error rate (unbiased for the m-token rate)."""
        if k not in self.topk_err_sum:
            raise ValueError(f"k={k} not tracked; UnitStats tracks k in {TOPK}")
        return self.topk_err_sum[k] / self.draws if self.draws else math.nan

    def topk_error_variance(self, k: int) -> float:
        return float(self._mean_var(self.topk_err_sum[k], self.topk_err_sumsq[k], self.draws)[1])

    def sq_about(self, center) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased variance over the draws of W(c) = unit mean of (l - c)^2 (bits^2),
        per alpha, for ``center`` c in bits (a scalar, [A], or [..., A] broadcast against the
        alphas). W = q - 2 c y + c^2, so E W^2 = E q^2 - 4 c E qy + 4 c^2 E y^2 + 2 c^2 E q
        - 4 c^3 E y + c^4 over the draws."""
        c = np.asarray(center, dtype=np.float64)
        n = self.draws
        if n == 0:
            nan = np.full(np.broadcast_shapes(c.shape, (len(self.alphas),)), math.nan)
            return nan, nan.copy()
        ey, eyy, eq, eqq, eyq = (getattr(self, name) / n for name in self._ARRAYS)
        mean = eq - 2 * c * ey + c * c
        ew2 = eqq - 4 * c * eyq + 4 * c * c * eyy + 2 * c * c * eq - 4 * c**3 * ey + c**4
        if n < 2:
            return mean, np.full(mean.shape, math.nan)
        var = np.maximum(ew2 - mean * mean, 0.0) * n / (n - 1)
        return mean, var

    # ------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": UNIT_STATS_FORMAT,
            "alphas": list(self.alphas),
            "vocab_size": self.vocab_size,
            "draws": int(self.draws),
            "tokens": int(self.tokens),
            **{name: [float(v) for v in getattr(self, name)] for name in self._ARRAYS},
            "sum_nll": float(self.sum_nll),
            "sum_nll_sq": float(self.sum_nll_sq),
            "topk_err_sum": {str(k): float(v) for k, v in self.topk_err_sum.items()},
            "topk_err_sumsq": {str(k): float(v) for k, v in self.topk_err_sumsq.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> UnitStats:
        if state.get("format") != UNIT_STATS_FORMAT:
            raise ValueError(f"not a UnitStats state (format={state.get('format')!r})")
        return cls(
            alphas=tuple(state["alphas"]),
            vocab_size=state["vocab_size"],
            draws=int(state["draws"]),
            tokens=int(state["tokens"]),
            **{name: np.array(state[name], dtype=np.float64) for name in cls._ARRAYS},
            sum_nll=float(state["sum_nll"]),
            sum_nll_sq=float(state["sum_nll_sq"]),
            topk_err_sum={int(k): float(v) for k, v in state["topk_err_sum"].items()},
            topk_err_sumsq={int(k): float(v) for k, v in state["topk_err_sumsq"].items()},
        )

    def to_json(self) -> str:
        return json.dumps(self.state_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> UnitStats:
        return cls.from_state_dict(json.loads(text))


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)
