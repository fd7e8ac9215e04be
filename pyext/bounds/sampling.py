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
i.i.d. results apply with E Z = the m-point mean.
"""

from __future__ import annotations

import math

from .results import check_count, check_delta, check_nonneg

__all__ = [
    "SAMPLING_KINDS",
    "bernstein_term",
    "hoeffding_term",
    "normalize_sampling",
    "sampling_term",
    "variance_upper_bound",
]

SAMPLING_KINDS = ("hoeffding", "bernstein")


def normalize_sampling(sampling: str) -> str:
    """Accept "hoeffding", "bernstein" / "empirical-bernstein" / "eb"."""
    aliases = {"hoeffding": "hoeffding", "bernstein": "bernstein",
               "empirical-bernstein": "bernstein", "empirical_bernstein": "bernstein",
               "eb": "bernstein"}
    if sampling not in aliases:
        raise ValueError(
            f"sampling must be 'hoeffding' or 'bernstein' (empirical Bernstein), got {sampling!r}"
        )
    return aliases[sampling]


def hoeffding_term(loss_range: float, sample_size: float, delta: float) -> float:
    """``Delta sqrt(ln(1/delta) / (2 s))``: one-sided Hoeffding deviation of a mean of s samples."""
    d = check_delta(delta)
    s = check_count(sample_size, "sample_size")
    rng = check_nonneg(loss_range, "loss_range")
    return rng * math.sqrt(math.log(1.0 / d) / (2.0 * s))


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
    if rng == 0.0:
        return 0.0
    v = var / (rng * rng)
    log_term = math.log(2.0 / d)
    return rng * (math.sqrt(2.0 * v * log_term / s) + 7.0 * log_term / (3.0 * (s - 1.0)))


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
