"""Token-level (Lotfi, Kuang et al. 2024) and document-level (Lotfi et al. 2023) bounds with
subsampling, and the top-k error bound (spec sections 3-4, 7, 9).

With probability >= 1 - delta, for all h (prior P from the code length),

    R(h) <= Rhat_s + Delta [ sqrt((log 1/P(h) - ln(r delta)) / (2 m))            (complexity)
                             + sqrt(-ln((1 - r) delta) / (2 s)) ],  r = s/(s+m)  (sampling)

The first root is Azuma-Hoeffding over the m training tokens plus a union bound over h; the
second bounds the m-token average from s uniform samples (with replacement). The empirical
Bernstein sampling term (Maurer & Pontil 2009, Thm 4) may replace the Hoeffding one.

Choosing the smoothing level after seeing the data is paid for:

* ``alpha_cost="union"`` (default): each of the G levels is run at ``delta / G`` (section 9),
  i.e. ``log2 G`` extra bits in the complexity term *and* a union over G in the sampling term,
  so the minimum over the grid holds with probability >= 1 - delta.
* ``alpha_cost="lotfi-code"``: the official code charges the i-th level (1-based, ascending
  alpha) ``8 i`` extra bits in the prior and runs the sampling term at the full ``(1 - r) delta``
  (reproduces the published numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .coding import log_prior_nats
from .prior import loss_range_bits, min_loss_bits, uniform_loss_bits
from .results import (
    Bound,
    TokenBound,
    check_alpha,
    check_choice,
    check_count,
    check_delta,
    check_finite,
    check_nonneg,
    check_vocab,
)
from .sampling import normalize_sampling, sampling_term

__all__ = ["document_bound", "topk_bound", "token_bound"]

ALPHA_COSTS = ("union", "lotfi-code")
_TOL = 1e-9


def _as_alpha_map(values: Any, alpha: float | None, name: str) -> dict[float, float]:
    if isinstance(values, Mapping):
        if not values:
            raise ValueError(f"{name} is an empty mapping; give at least one smoothing level")
        if alpha is not None:
            raise ValueError(f"pass alpha=... only with a single float {name}, not a mapping")
        out = {check_alpha(a): check_finite(v, f"{name}[{a}]") for a, v in values.items()}
        if len(out) != len(values):
            raise ValueError(f"{name} has duplicate smoothing levels")
        return dict(sorted(out.items()))
    if alpha is None:
        raise ValueError(
            f"{name} is a single number: pass its smoothing level alpha=..., or a mapping "
            "{alpha: value}"
        )
    return {check_alpha(alpha): check_finite(values, name)}


def _as_variance_map(variance: Any, alphas: list[float], name: str) -> dict[float, float] | None:
    if variance is None:
        return None
    if isinstance(variance, Mapping):
        out = {check_alpha(a): check_nonneg(v, f"{name}[{a}]") for a, v in variance.items()}
        missing = [a for a in alphas if a not in out]
        if missing:
            raise ValueError(f"{name} lacks the smoothing levels {missing}")
        return out
    if len(alphas) != 1:
        raise ValueError(f"{name} must be a mapping {{alpha: variance}} when several levels are given")
    return {alphas[0]: check_nonneg(variance, name)}


def _check_sizes(m: Any, s: Any, m_name: str, s_name: str) -> tuple[float, float | None]:
    m_val = check_count(m, m_name)
    if s is None:
        return m_val, None
    s_val = check_count(s, s_name)
    if s_val > m_val:
        raise ValueError(
            f"{s_name}={s!r} exceeds {m_name}={m!r}: the sample is drawn from the training set; "
            f"evaluate every point instead ({s_name}=None) or check the arguments are not swapped"
        )
    return m_val, s_val


def _check_in_range(value: float, lo: float, hi: float, name: str) -> None:
    if value < lo - _TOL * max(1.0, abs(lo)) or value > hi + _TOL * max(1.0, abs(hi)):
        raise ValueError(f"{name}={value!r} is outside the possible loss range [{lo:.6g}, {hi:.6g}]")


def _hp_terms(
    *,
    loss_range: float,
    log_prior: float,
    m: float,
    s: float | None,
    delta: float,
    sampling: str,
    variance: float | None,
) -> tuple[float, float, float]:
    """(complexity, sampling, r) of the section-3 formula for one candidate."""
    if s is None:
        r = 1.0
        samp = 0.0
    else:
        r = s / (s + m)
        samp = sampling_term(sampling, loss_range, s, (1.0 - r) * delta, variance)
    complexity = loss_range * math.sqrt((log_prior - math.log(r * delta)) / (2.0 * m))
    return complexity, samp, r


def _level_bound(
    empirical_bits: Any,
    *,
    coded_bits: float,
    m: Any,
    s: Any,
    vocab_size: int,
    delta: float,
    extra_bits: float,
    alpha_cost: str,
    sampling: str,
    alpha: float | None,
    variance_bits: Any,
    level: str,
) -> TokenBound:
    delta = check_delta(delta)
    v = check_vocab(vocab_size)
    coded = check_nonneg(coded_bits, "coded_bits")
    extra = check_nonneg(extra_bits, "extra_bits")
    check_choice(alpha_cost, "alpha_cost", ALPHA_COSTS)
    kind = normalize_sampling(sampling)
    names = ("train_tokens", "sample_tokens") if level == "token" else ("train_documents", "sample_documents")
    m_val, s_val = _check_sizes(m, s, *names)
    emp = _as_alpha_map(empirical_bits, alpha, "empirical_bits")
    alphas = list(emp)
    var = _as_variance_map(variance_bits, alphas, "variance_bits")
    if kind == "bernstein" and s_val is not None and var is None:
        raise ValueError("sampling='bernstein' needs variance_bits (unbiased sample variance, bits^2)")
    if kind == "bernstein" and s_val is not None and s_val < 2:
        raise ValueError("sampling='bernstein' needs at least 2 sampled points")
    grid = len(alphas)
    candidates = []
    for i, a in enumerate(alphas, start=1):
        rng = loss_range_bits(a, v)
        lo = min_loss_bits(a, v)
        _check_in_range(emp[a], lo, lo + rng, f"empirical_bits[{a}]")
        if alpha_cost == "union":
            cost_bits, d_c, paid = 0.0, delta / grid, f"delta/{grid}"
        else:
            cost_bits, d_c, paid = 8.0 * i, delta, f"{8 * i} bits"
        lp = log_prior_nats(coded, extra + cost_bits)
        variance = None if var is None else var[a]
        comp, samp, r = _hp_terms(loss_range=rng, log_prior=lp, m=m_val, s=s_val, delta=d_c,
                                  sampling=kind, variance=variance)
        comp_full, samp_full, _ = _hp_terms(loss_range=rng, log_prior=log_prior_nats(coded, extra),
                                            m=m_val, s=s_val, delta=delta, sampling=kind,
                                            variance=variance)
        candidates.append({
            "alpha": a, "index": i, "loss_range_bits": rng, "empirical_bits": emp[a],
            "extra_bits": extra + cost_bits, "delta": d_c, "paid": paid, "r": r,
            "log_prior_nats": lp, "complexity_bits": comp, "sampling_bits": samp,
            "bound_bits": emp[a] + comp + samp,
            "bound_bits_alone_full_delta": emp[a] + comp_full + samp_full,
        })
    best = min(candidates, key=lambda c: c["bound_bits"])
    uniform = uniform_loss_bits(v)
    cost = (f"union over {grid} smoothing levels: each at delta/{grid}" if alpha_cost == "union"
            else f"lotfi-code: 8 i extra bits for the i-th of {grid} levels")
    return TokenBound(
        bound_bits=best["bound_bits"], alpha=best["alpha"], empirical_bits=best["empirical_bits"],
        complexity_bits=best["complexity_bits"], sampling_bits=best["sampling_bits"],
        vacuous=best["bound_bits"] > uniform, uniform_bits=uniform,
        loss_range_bits=best["loss_range_bits"], log_prior_nats=best["log_prior_nats"],
        coded_bits=coded, train_tokens=m_val, sample_tokens=s_val, vocab_size=v, delta=delta,
        extra_bits=extra, alpha_cost=alpha_cost, sampling=kind, chosen_among=grid,
        choice_cost=cost if grid > 1 or alpha_cost == "lotfi-code" else "none (one level)",
        level=level, candidates=tuple(candidates),
    )


def token_bound(
    empirical_bits: Mapping[float, float] | float,
    *,
    coded_bits: float,
    train_tokens: float,
    sample_tokens: float | None,
    vocab_size: int,
    delta: float = 0.05,
    extra_bits: float = 0.0,
    alpha_cost: str = "union",
    sampling: str = "hoeffding",
    alpha: float | None = None,
    variance_bits: Mapping[float, float] | float | None = None,
) -> TokenBound:
    """Token-level bound on the average conditional risk (bits per token), spec section 3.

    ``empirical_bits``: ``{alpha: mean smoothed loss in bits over the s sampled tokens}`` (or one
    float with ``alpha=...``). ``coded_bits``: raw code length C of the model (2 log2 C and
    ``extra_bits`` are added here). ``sample_tokens=None`` means every training token was
    evaluated (no sampling term, r = 1). ``sampling="bernstein"`` needs ``variance_bits``
    (unbiased sample variance per alpha, bits^2). Example (lotfi-code, m = 8009762, s = 1e4,
    C = 1e5, extra 7, V = 50257, Rhat = 5): 7.255739 at alpha = 1e-4, 6.219056 at 0.5.
    """
    return _level_bound(
        empirical_bits, coded_bits=coded_bits, m=train_tokens, s=sample_tokens,
        vocab_size=vocab_size, delta=delta, extra_bits=extra_bits, alpha_cost=alpha_cost,
        sampling=sampling, alpha=alpha, variance_bits=variance_bits, level="token",
    )


def document_bound(
    empirical_bits: Mapping[float, float] | float,
    *,
    coded_bits: float,
    train_documents: float,
    sample_documents: float | None,
    vocab_size: int,
    delta: float = 0.05,
    extra_bits: float = 0.0,
    alpha_cost: str = "union",
    sampling: str = "hoeffding",
    alpha: float | None = None,
    variance_bits: Mapping[float, float] | float | None = None,
) -> TokenBound:
    """Document-level bound (Lotfi et al. 2023, spec section 4): the section-3 formula with m =
    number of training documents (i.i.d.) and ``empirical_bits`` the mean over sampled
    documents of the per-document average smoothed loss (which lies in the same interval).
    It shows why counting documents instead of tokens is vacuous at scale.
    """
    return _level_bound(
        empirical_bits, coded_bits=coded_bits, m=train_documents, s=sample_documents,
        vocab_size=vocab_size, delta=delta, extra_bits=extra_bits, alpha_cost=alpha_cost,
        sampling=sampling, alpha=alpha, variance_bits=variance_bits, level="document",
    )


def topk_bound(
    error_rate: float,
    *,
    coded_bits: float,
    train_tokens: float,
    sample_tokens: float | None,
    delta: float = 0.05,
    extra_bits: float = 0.0,
    sampling: str = "hoeffding",
    k: int | None = None,
    vocab_size: int | None = None,
) -> Bound:
    """Bound on the top-k error rate (spec section 3): the section-3 formula with Delta = 1, the
    empirical top-k error as Rhat and no smoothing cost. The Bernstein variant uses the
    Bernoulli sample variance ``s/(s-1) e (1 - e)``. ``vacuous`` compares with the uniform
    predictor's error ``1 - k/V`` when ``k`` and ``vocab_size`` are given (else 1).
    Example: m = 8009762, s = 1e4, C = 1e5, extra 7, error 0.70 -> 0.778038202.
    """
    d = check_delta(delta)
    e = check_finite(error_rate, "error_rate")
    if not 0.0 <= e <= 1.0:
        raise ValueError(f"error_rate must lie in [0, 1], got {error_rate!r}")
    coded = check_nonneg(coded_bits, "coded_bits")
    extra = check_nonneg(extra_bits, "extra_bits")
    kind = normalize_sampling(sampling)
    m_val, s_val = _check_sizes(train_tokens, sample_tokens, "train_tokens", "sample_tokens")
    variance = None
    if s_val is not None and kind == "bernstein":
        if s_val < 2:
            raise ValueError("sampling='bernstein' needs at least 2 sampled tokens")
        variance = s_val / (s_val - 1.0) * e * (1.0 - e)
    lp = log_prior_nats(coded, extra)
    comp, samp, r = _hp_terms(loss_range=1.0, log_prior=lp, m=m_val, s=s_val, delta=d,
                              sampling=kind, variance=variance)
    uniform = 1.0
    if k is not None and vocab_size is not None:
        v = check_vocab(vocab_size)
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        uniform = max(0.0, 1.0 - k / v)
    total = e + comp + samp
    return Bound(
        name=f"top-{k} error" if k is not None else "top-k error",
        bound=total, empirical=e, complexity=comp, sampling=samp, vacuous=total > uniform,
        uniform=uniform, delta=d, loss_range=1.0, log_prior_nats=lp, units="error rate",
        inputs={"error_rate": e, "coded_bits": coded, "train_tokens": m_val,
                "sample_tokens": s_val, "delta": d, "extra_bits": extra, "sampling": kind,
                "k": k, "vocab_size": vocab_size, "r": r},
    )
