"""Smoothed-loss ranges and the union-bound bookkeeping shared by the bounds (spec sections 1-3).

The smoothed prediction ``p_a = (1 - a) p + a / V`` makes the per-token loss in bits,
``-log2 p_a(y)``, lie in ``[-log2(1 - a + a/V), log2(V/a)]``, an interval of width
``Delta(a, V) = log2(1 + (1 - a) V / a)`` (Lotfi, Kuang et al. 2024, arXiv 2407.18158).
"""

from __future__ import annotations

import math

from .coding import log_prior_nats, prefix_free_bits
from .results import check_alpha, check_vocab

__all__ = [
    "loss_range_bits",
    "log_prior_nats",
    "max_loss_bits",
    "min_loss_bits",
    "prefix_free_bits",
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
