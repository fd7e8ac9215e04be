"""Baselines: the classic parameter-counting bound (spec section 5) and the information-
theoretic bound in expectation (Xu & Raginsky 2017; spec section 8)."""

from __future__ import annotations

import math

from ._checks import (
    check_alpha,
    check_count,
    check_delta,
    check_finite,
    check_nonneg,
    check_vocab,
    prior_bits,
)
from .coding import log_prior_nats
from .prior import loss_range_bits, min_loss_bits, uniform_loss_bits
from .results import Bound, invalidate

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
        name="parameter-count",
        label=f"parameter-count bound ({n_par:.6g} parameters x {b:g} bits, m = {m:.6g} documents)",
        bound_bits=total, empirical_bits=emp, complexity_bits=comp, sampling_bits=0.0,
        vacuous=total > uniform, uniform_bits=uniform, delta=d, loss_range_bits=rng,
        log_prior_nats=lp, alpha=alpha,
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
    """Information-theoretic bound **in expectation** (Xu & Raginsky 2017) on the average
    conditional risk over m tokens, loss in an interval of width Delta:

        E[R(W) - Rhat(W)] <= sqrt(2 (Delta/2)^2 I(W; S) / m) = Delta sqrt(I(W; S) / (2 m)),

    with S = x_1..x_m the training sequence, W = the trained model, R(w) = (1/m) sum_k
    E[l_k(w) | x_<k] and Rhat(w) = (1/m) sum_k l_k(w).

    Why it holds for tokens (not only for i.i.d. points): for a fixed w the terms
    D_k = E[l_k(w) | x_<k] - l_k(w) are martingale differences in an interval of width Delta, so
    Hoeffding's lemma conditionally on x_<k and the tower rule give the Azuma moment bound
    ``E_S exp(t m (R(w) - Rhat(w))) <= exp(m t^2 Delta^2 / 8)`` for every t. The
    Donsker-Varadhan variational formula between the joint law of (W, S) and the product of its
    marginals, ``E[f(W, S)] <= I(W; S) + ln E_{W' x S}[exp f(W', S)]`` with W' an independent
    copy of W and f = t m (R - Rhat), then gives ``t m E[R - Rhat] <= I(W; S) + m t^2 Delta^2 / 8``;
    the best t yields the bound. A sampled Rhat_s (tokens or window units, drawn independently of
    everything else) is unbiased for Rhat_m, so the bound holds for it in expectation too.

    I(W; S) <= H(W) <= E[len(W)] ln 2 for a prefix-free code of W (Shannon). **This function uses
    the realised code length** ``(C + 2 log2 C + extra) ln 2`` in place of E[len]: exact for a
    fixed-length code, otherwise an approximation (the realised C of one run is not its
    expectation over the draw of the data). Not a high-probability statement:
    ``kind="expectation"`` and ``delta`` is NaN.
    """
    emp = check_finite(empirical_bits, "empirical_bits")
    coded, prior_caveat = prior_bits(coded_bits)
    extra = check_nonneg(extra_bits, "extra_bits")
    m = check_count(train_points, "train_points")
    rng, _ = _range(alpha, loss_range_bits, vocab_size)
    info = log_prior_nats(coded, extra)
    comp = math.sqrt(2.0 * (rng / 2.0) ** 2 * info / m)
    uniform = uniform_loss_bits(check_vocab(vocab_size)) if vocab_size is not None else math.inf
    total = emp + comp
    result = Bound(
        name="mutual-information (expectation)",
        label="mutual-information bound in expectation (Xu & Raginsky 2017; realised C for E[len])",
        bound_bits=total, empirical_bits=emp, complexity_bits=comp, sampling_bits=0.0,
        vacuous=total > uniform, uniform_bits=uniform, delta=math.nan, loss_range_bits=rng,
        log_prior_nats=info, kind="expectation", alpha=alpha,
        caveats=("in expectation over the draw of the data, not with high probability",
                 "uses the realised code length C in place of E[len] >= H(W) >= I(W; S)"),
        inputs={"empirical_bits": emp, "coded_bits": coded, "extra_bits": extra,
                "train_points": m, "vocab_size": vocab_size, "alpha": alpha,
                "loss_range_bits": rng},
        notes="bound on the expected generalization gap over the draw of the training set",
    )
    if prior_caveat is not None:
        result = invalidate(result, "heuristic", prior_caveat)
    return result
