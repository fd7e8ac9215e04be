"""Sampling terms: how far the mean over all m points can exceed the mean over s uniform samples
drawn with replacement (spec section 7).

* Hoeffding (official token-bounds code): ``Delta sqrt(ln(1/delta) / (2 s))``.
* Empirical Bernstein (Maurer & Pontil 2009, "Empirical Bernstein Bounds and Sample Variance
  Penalization", Theorem 4), for ``Z = X / Delta`` in [0, 1] and s >= 2:
  ``E Z <= Zbar + sqrt(2 V_s ln(2/delta) / s) + 7 ln(2/delta) / (3 (s - 1))``,
  ``V_s`` the unbiased sample variance of Z.
* Variance upper bound (Maurer & Pontil 2009, Theorem 10): for s >= 2,
  ``sqrt(sigma^2) <= sqrt(V_s) + sqrt(2 ln(1/delta) / (s - 1))`` with probability >= 1 - delta,
  sigma^2 = E V_s the population variance (here: the variance of the m-point population).

Sampling with replacement makes the s draws i.i.d. from the m-point population, so these
i.i.d. results apply with E Z = the m-point mean. The same holds for window-unit (cluster)
samples (spec section 3b): the s unit means of the drawn units are i.i.d. in the loss interval
with mean Rhat_m, so these terms apply with s = the number of draws.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._checks import SAMPLING_KINDS, check_count, check_delta, check_nonneg, normalize_sampling

__all__ = [
    "SAMPLING_KINDS",
    "bernstein_term",
    "hoeffding_term",
    "normalize_sampling",
    "sampling_term",
    "sampling_value",
    "variance_upper_bound",
]

def hoeffding_term(loss_range: float, sample_size: float, delta: float) -> float:
    """``Delta sqrt(ln(1/delta) / (2 s))``: one-sided Hoeffding deviation of a mean of s samples."""
    d = check_delta(delta)
    s = check_count(sample_size, "sample_size")
    rng = check_nonneg(loss_range, "loss_range")
    return sampling_value("hoeffding", rng, s, d, None)


def bernstein_term(
    loss_range: float, sample_size: float, delta: float, sample_variance: float
) -> float:
    """Empirical Bernstein deviation (Maurer & Pontil 2009, Thm 4) in the loss's units:

    ``Delta [ sqrt(2 V ln(2/delta) / s) + 7 ln(2/delta) / (3 (s - 1)) ]``, ``V = var / Delta^2``
    (``sample_variance`` is the unbiased sample variance in the loss's units squared).
    """
    d = check_delta(delta)
    s = check_count(sample_size, "sample_size", minimum=2)
    rng = check_nonneg(loss_range, "loss_range")
    var = check_nonneg(sample_variance, "sample_variance")
    return sampling_value("bernstein", rng, s, d, var)


def hoeffding_array(loss_range: Any, sample_size: float, delta: Any) -> np.ndarray:
    """:func:`hoeffding_term` without validation, broadcasting over numpy arrays."""
    return np.asarray(loss_range) * np.sqrt(np.log(1.0 / np.asarray(delta)) / (2.0 * sample_size))


def bernstein_array(loss_range: Any, sample_size: float, delta: Any, sample_variance: Any) -> np.ndarray:
    """:func:`bernstein_term` without validation, broadcasting over numpy arrays (range > 0)."""
    rng = np.asarray(loss_range, dtype=np.float64)
    v = np.asarray(sample_variance, dtype=np.float64) / (rng * rng)
    log_term = np.log(2.0 / np.asarray(delta, dtype=np.float64))
    return rng * (np.sqrt(2.0 * v * log_term / sample_size) + 7.0 * log_term / (3.0 * (sample_size - 1.0)))


def sampling_term(
    sampling: str,
    loss_range: float,
    sample_size: float,
    delta: float,
    sample_variance: float | None = None,
) -> float:
    """Dispatch to :func:`hoeffding_term` or :func:`bernstein_term` (which needs the variance)."""
    kind = normalize_sampling(sampling)
    if kind == "hoeffding":
        return hoeffding_term(loss_range, sample_size, delta)
    if sample_variance is None:
        raise ValueError(
            "sampling='bernstein' needs the sample variance of the losses (variance_bits=...); "
            "LossStats.variance_bits gives it"
        )
    return bernstein_term(loss_range, sample_size, delta, sample_variance)


def sampling_value(kind: str, loss_range: float, sample_size: float, delta: float,
                   sample_variance: float | None) -> float:
    """:func:`sampling_term` for arguments the caller has validated (``kind`` normalised; the
    variance present for "bernstein"): the bounds' inner loops call this."""
    if kind == "hoeffding":
        return float(hoeffding_array(loss_range, sample_size, delta))
    if sample_variance is None:
        raise ValueError(
            "sampling='bernstein' needs the sample variance of the losses (variance_bits=...); "
            "LossStats.variance_bits gives it"
        )
    if loss_range == 0.0:
        return 0.0
    return float(bernstein_array(loss_range, sample_size, delta, sample_variance))


def variance_upper_bound(
    loss_range: float, sample_size: float, delta: float, sample_variance: float
) -> float:
    """Upper confidence bound on the population variance (Maurer & Pontil 2009, Thm 10):

    ``(sqrt(var) + Delta sqrt(2 ln(1/delta) / (s - 1)))^2``, capped at ``Delta^2 / 4`` (the largest
    variance of anything in an interval of width Delta).
    """
    d = check_delta(delta)
    s = check_count(sample_size, "sample_size", minimum=2)
    rng = check_nonneg(loss_range, "loss_range")
    var = check_nonneg(sample_variance, "sample_variance")
    ub = (math.sqrt(var) + rng * math.sqrt(2.0 * math.log(1.0 / d) / (s - 1.0))) ** 2
    return min(ub, rng * rng / 4.0)
