"""Smoothed-loss ranges and the union-bound bookkeeping shared by the bounds (spec sections 1-3).

The smoothed prediction ``p_a = (1 - a) p + a / V`` makes the per-token loss in bits,
``-log2 p_a(y)``, lie in ``[-log2(1 - a + a/V), log2(V/a)]``, an interval of width
``Delta(a, V) = log2(1 + (1 - a) V / a)`` (Lotfi, Kuang et al. 2024, arXiv 2407.18158).
"""

from __future__ import annotations

import math

from ._checks import check_alpha, check_vocab
from .coding import log_prior_nats, prefix_free_bits

__all__ = [
    "ALPHA_COSTS",
    "loss_range_bits",
    "log_prior_nats",
    "max_loss_bits",
    "min_loss_bits",
    "prefix_free_bits",
    "smoothing_cost_text",
    "smoothing_costs",
    "uniform_loss_bits",
]


def loss_range_bits(alpha: float, vocab_size: int) -> float:
    """Width ``Delta(a, V) = log2(1 + (1 - a) V / a)`` of the smoothed loss range, in bits.

    Example (V = 50257): Delta(1e-4) = 28.904605, Delta(0.01) = 22.246394, Delta(0.5) = 15.617066.
    """
    a = check_alpha(alpha)
    v = check_vocab(vocab_size)
    return math.log2(1.0 + (1.0 - a) * v / a)


def min_loss_bits(alpha: float, vocab_size: int) -> float:
    """Smallest possible smoothed loss ``-log2(1 - a + a/V)`` (the target has p = 1)."""
    a = check_alpha(alpha)
    v = check_vocab(vocab_size)
    return -math.log2(1.0 - a + a / v)


def max_loss_bits(alpha: float, vocab_size: int) -> float:
    """Largest possible smoothed loss ``log2(V / a)`` (the target has p = 0)."""
    a = check_alpha(alpha)
    v = check_vocab(vocab_size)
    return math.log2(v / a)


def uniform_loss_bits(vocab_size: int) -> float:
    """Loss of the uniform predictor, ``log2 V`` bits: a bound above it is vacuous."""
    return math.log2(check_vocab(vocab_size))


ALPHA_COSTS = ("union", "lotfi-code", "lotfi-code-corrected")
"""How a bound pays for choosing the smoothing level after seeing the data (spec section 3)."""


def smoothing_costs(alpha_cost: str, grid: int) -> list[tuple[float, int, int]]:
    """Per smoothing level i = 1..G (ascending alpha): ``(extra_bits, complexity_divisor,
    sampling_divisor)``: the level's prior pays ``extra_bits`` more, its training-token
    (complexity) event runs at its share of delta / ``complexity_divisor`` and its sampling
    events at their share / ``sampling_divisor``.

    * ``"union"``: every level at delta / G in both events (valid);
    * ``"lotfi-code"``: the official code's 8 i bits in the prior, sampling at the full share
      (valid only without a sampling term, or for one level);
    * ``"lotfi-code-corrected"``: 8 i bits in the prior (sum_i 2^-8i < 1 pays the complexity
      event) and the sampling events at their share / G (valid).
    """
    if alpha_cost == "union":
        return [(0.0, grid, grid) for _ in range(grid)]
    if alpha_cost == "lotfi-code":
        return [(8.0 * i, 1, 1) for i in range(1, grid + 1)]
    if alpha_cost == "lotfi-code-corrected":
        return [(8.0 * i, 1, grid) for i in range(1, grid + 1)]
    raise ValueError(f"alpha_cost must be one of {ALPHA_COSTS}, got {alpha_cost!r}")


def smoothing_cost_text(alpha_cost: str, grid: int) -> str:
    """How the smoothing choice was paid, for the ``choice_cost`` field."""
    if alpha_cost == "union":
        return f"union over {grid} smoothing levels: each at delta/{grid}" if grid > 1 else "one smoothing level, no choice"
    text = f"lotfi-code: 8 i extra bits for the i-th of {grid} levels"
    if alpha_cost == "lotfi-code":
        return text + (", sampling term unpaid (at the full (1 - r) delta)" if grid > 1 else "")
    return text + f", sampling term at (1 - r) delta/{grid}"
