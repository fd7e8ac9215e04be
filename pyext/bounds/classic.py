"""Baselines: the classic parameter-counting bound (spec section 5) and the information-
theoretic bound in expectation (Xu & Raginsky 2017; spec section 8)."""

from __future__ import annotations

import math

from .coding import log_prior_nats
from .prior import loss_range_bits, min_loss_bits, uniform_loss_bits
from .results import (
    Bound,
    check_alpha,
    check_count,
    check_delta,
    check_finite,
    check_nonneg,
    check_vocab,
)

__all__ = ["mutual_information_bound", "parameter_count_bound"]


def _range(alpha: float | None, loss_range: float | None, vocab_size: int | None) -> tuple[float, float | None]:
    """(Delta, minimum loss or None) from a smoothing level or an explicit range."""
    if alpha is not None:
        if loss_range is not None:
            raise ValueError("pass either alpha (with vocab_size) or loss_range_bits, not both")
        if vocab_size is None:
            raise ValueError("alpha needs vocab_size to give the loss range")
        a = check_alpha(alpha)
        return loss_range_bits(a, vocab_size), min_loss_bits(a, vocab_size)
    if loss_range is None:
        raise ValueError("give the smoothing level alpha (with vocab_size) or loss_range_bits")
    rng = check_nonneg(loss_range, "loss_range_bits")
    return rng, None


def parameter_count_bound(
    empirical_bits: float,
    *,
    num_parameters: float,
    train_documents: float,
    bits_per_parameter: float = 16.0,
    vocab_size: int | None = None,
    alpha: float | None = None,
    loss_range_bits: float | None = None,
    delta: float = 0.05,
) -> Bound:
    """Classic ("traditional PAC-Bayes" / Occam) bound counting parameters (spec section 5):

    ``log 1/P(h) = N b ln 2`` (N parameters at b bits each), m = i.i.d. training documents,
    ``bound = Rhat + Delta sqrt((N b ln 2 + ln(1/delta)) / (2 m))``, Rhat the mean per-document
    loss over all m documents. Vacuous when above log2 V (the uniform predictor).
    """
    d = check_delta(delta)
    emp = check_finite(empirical_bits, "empirical_bits")
    n_par = check_nonneg(num_parameters, "num_parameters")
    b = check_nonneg(bits_per_parameter, "bits_per_parameter")
    m = check_count(train_documents, "train_documents")
    rng, lo = _range(alpha, loss_range_bits, vocab_size)
    if lo is not None and not lo - 1e-9 <= emp <= lo + rng + 1e-9:
        raise ValueError(f"empirical_bits={emp!r} is outside the loss range [{lo:.6g}, {lo + rng:.6g}]")
    lp = n_par * b * math.log(2.0)
    comp = rng * math.sqrt((lp + math.log(1.0 / d)) / (2.0 * m))
    uniform = uniform_loss_bits(vocab_size) if vocab_size is not None else math.inf
    total = emp + comp
    return Bound(
        name="parameter-count", bound=total, empirical=emp, complexity=comp, sampling=0.0,
        vacuous=total > uniform, uniform=uniform, delta=d, loss_range=rng, log_prior_nats=lp,
        alpha=alpha,
        inputs={"empirical_bits": emp, "num_parameters": n_par, "bits_per_parameter": b,
                "train_documents": m, "vocab_size": vocab_size, "alpha": alpha,
                "loss_range_bits": rng, "delta": d},
    )


def mutual_information_bound(
    empirical_bits: float,
    *,
    coded_bits: float,
    train_points: float,
    extra_bits: float = 0.0,
    vocab_size: int | None = None,
    alpha: float | None = None,
    loss_range_bits: float | None = None,
) -> Bound:
    """Information-theoretic bound **in expectation** (Xu & Raginsky 2017), i.i.d. points, loss in
    an interval of width Delta (so Delta/2-sub-Gaussian):

    ``E[R - Rhat] <= sqrt(2 (Delta/2)^2 I(W; S) / m)``, ``I(W; S) <= H(W) <= (C + 2 log2 C +
    extra) ln 2`` nats (the prefix-free length, as for the other bounds). Not a high-probability
    statement: ``kind="expectation"`` and ``delta`` is NaN.
    """
    emp = check_finite(empirical_bits, "empirical_bits")
    coded = check_nonneg(coded_bits, "coded_bits")
    extra = check_nonneg(extra_bits, "extra_bits")
    m = check_count(train_points, "train_points")
    rng, _ = _range(alpha, loss_range_bits, vocab_size)
    info = log_prior_nats(coded, extra)
    comp = math.sqrt(2.0 * (rng / 2.0) ** 2 * info / m)
    uniform = uniform_loss_bits(check_vocab(vocab_size)) if vocab_size is not None else math.inf
    total = emp + comp
    return Bound(
        name="mutual-information (expectation)", bound=total, empirical=emp, complexity=comp,
        sampling=0.0, vacuous=total > uniform, uniform=uniform, delta=math.nan, loss_range=rng,
        log_prior_nats=info, kind="expectation", alpha=alpha,
        inputs={"empirical_bits": emp, "coded_bits": coded, "extra_bits": extra,
                "train_points": m, "vocab_size": vocab_size, "alpha": alpha,
                "loss_range_bits": rng},
        notes="bound on the expected generalization gap over the draw of the training set",
    )
