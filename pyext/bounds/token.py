"""Token-level (Lotfi, Kuang et al. 2024) and document-level (Lotfi et al. 2023) bounds with
subsampling, and the top-k error bound (spec sections 3-4, 7, 9).

With probability >= 1 - delta, for all h (prior P from the code length),

    R(h) <= Rhat_s + Delta [ sqrt((log 1/P(h) - ln(r delta)) / (2 m))            (complexity)
                             + sqrt(-ln((1 - r) delta) / (2 s)) ],  r = s/(s+m)  (sampling)

The first root is Azuma-Hoeffding over the m training tokens plus a union bound over h; the
second bounds the m-token average from s uniform samples (with replacement). The empirical
Bernstein sampling term (Maurer & Pontil 2009, Thm 4) may replace the Hoeffding one. With a
window-unit (cluster) sample (spec 3b, ``sample_design="units"``) Rhat_s and the variance are
those of the s drawn units' mean losses, which are i.i.d. in the loss interval with mean
Rhat_m, so the same terms apply with s = the number of draws.

Choosing the smoothing level after seeing the data is paid for (:func:`~.prior.smoothing_costs`):

* ``alpha_cost="union"`` (default): each of the G levels is run at ``delta / G`` (section 9),
  i.e. ``log2 G`` extra bits in the complexity term *and* a union over G in the sampling term,
  so the minimum over the grid holds with probability >= 1 - delta.
* ``alpha_cost="lotfi-code"``: the official code charges the i-th level (1-based, ascending
  alpha) ``8 i`` extra bits in the prior and runs the sampling term at the full ``(1 - r) delta``
  (reproduces the published numbers). With a sampling term and G > 1 levels the minimum holds
  only with probability >= 1 - (r delta + G (1 - r) delta): the result says so
  (``valid=False``, ``kind="official-formula"``). A full pass (no sampling term) is valid.
* ``alpha_cost="lotfi-code-corrected"``: the official 8 i bits and the sampling term at
  ``(1 - r) delta / G``: valid.

``sample_reuse=K`` pays for having compared K configurations by bounds on this same sample
(every sampling event at its share / K; the prior side of that choice goes in ``extra_bits``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ._checks import (
    SAMPLE_DESIGNS,
    bound_inputs,
    check_delta,
    check_finite,
    check_in_range,
    check_nonneg,
    check_sizes,
    check_union_size,
    check_vocab,
    design_of,
    design_text,
    normalize_sampling,
    prior_bits,
)
from .coding import log_prior_nats
from .prior import (
    ALPHA_COSTS,
    loss_range_bits,
    min_loss_bits,
    smoothing_cost_text,
    smoothing_costs,
    uniform_loss_bits,
)
from .results import Bound, BoundResult, TokenBound, mark_validity
from .sampling import sampling_value

__all__ = ["ALPHA_COSTS", "SAMPLE_DESIGNS", "document_bound", "token_bound", "topk_bound"]


def hp_terms(
    *,
    loss_range: float,
    log_prior: float,
    m: float,
    s: float | None,
    delta_complexity: float,
    delta_sampling: float,
    sampling: str,
    variance: float | None,
) -> tuple[float, float, float]:
    """(complexity, sampling, r) of the section-3 formula: the complexity event at
    ``r delta_complexity``, the sampling event at ``(1 - r) delta_sampling``."""
    if s is None:
        r = 1.0
        samp = 0.0
    else:
        r = s / (s + m)
        samp = sampling_value(sampling, loss_range, s, (1.0 - r) * delta_sampling, variance)
    complexity = loss_range * math.sqrt((log_prior - math.log(r * delta_complexity)) / (2.0 * m))
    return complexity, samp, r


def _level_bound(
    empirical_bits: Any,
    *,
    coded_bits: Any,
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
    sample_design: str = "tokens",
    sample_reuse: int = 1,
) -> BoundResult:
    names = ("train_tokens", "sample_tokens") if level == "token" else ("train_documents", "sample_documents")
    inp = bound_inputs(empirical_bits=empirical_bits, variance_bits=variance_bits, alpha=alpha,
                       coded_bits=coded_bits, m=m, s=s, names=names, vocab_size=vocab_size, delta=delta,
                       extra_bits=extra_bits, alpha_cost=alpha_cost, alpha_costs=ALPHA_COSTS,
                       sampling=sampling, sample_design=sample_design, sample_reuse=sample_reuse)
    delta, v, coded, prior_caveat, extra = inp.delta, inp.vocab_size, inp.coded_bits, inp.prior_caveat, inp.extra_bits
    kind, reuse, m_val, s_val, design = inp.sampling, inp.sample_reuse, inp.m, inp.s, inp.design
    emp, var, alphas = inp.empirical, inp.variance, inp.alphas
    if kind == "bernstein" and s_val is not None and var is None:
        raise ValueError("sampling='bernstein' needs variance_bits (unbiased sample variance, bits^2)")
    if kind == "bernstein" and s_val is not None and s_val < 2:
        raise ValueError("sampling='bernstein' needs at least 2 sampled points")
    grid = len(alphas)
    candidates = []
    for i, (a, (cost_bits, div_c, div_s)) in enumerate(zip(alphas, smoothing_costs(alpha_cost, grid),
                                                           strict=True), start=1):
        rng = loss_range_bits(a, v)
        lo = min_loss_bits(a, v)
        check_in_range(emp[a], lo, lo + rng, f"empirical_bits[{a}]")
        lp = log_prior_nats(coded, extra + cost_bits)
        variance = None if var is None else var[a]
        comp, samp, r = hp_terms(loss_range=rng, log_prior=lp, m=m_val, s=s_val,
                                 delta_complexity=delta / div_c,
                                 delta_sampling=delta / (div_s * reuse), sampling=kind,
                                 variance=variance)
        comp_full, samp_full, _ = hp_terms(loss_range=rng, log_prior=log_prior_nats(coded, extra),
                                           m=m_val, s=s_val, delta_complexity=delta,
                                           delta_sampling=delta / reuse, sampling=kind,
                                           variance=variance)
        candidates.append({
            "alpha": a, "index": i, "loss_range_bits": rng, "empirical_bits": emp[a],
            "extra_bits": extra + cost_bits, "delta": delta / div_c,
            "delta_complexity": r * delta / div_c,
            "delta_sampling": 0.0 if s_val is None else (1.0 - r) * delta / (div_s * reuse),
            "paid": f"{cost_bits:g} bits, complexity at r delta/{div_c}, sampling at (1 - r) delta/{div_s * reuse}",
            "r": r, "log_prior_nats": lp, "complexity_bits": comp, "sampling_bits": samp,
            "bound_bits": emp[a] + comp + samp,
            "bound_bits_alone_full_delta": emp[a] + comp_full + samp_full,
        })
    best = min(candidates, key=lambda c: c["bound_bits"])
    uniform = uniform_loss_bits(v)
    cost = smoothing_cost_text(alpha_cost, grid)
    name = "token-level" if level == "token" else "document-level"
    result = TokenBound(
        bound_bits=best["bound_bits"], alpha=best["alpha"], empirical_bits=best["empirical_bits"],
        complexity_bits=best["complexity_bits"], sampling_bits=best["sampling_bits"],
        vacuous=best["bound_bits"] > uniform, uniform_bits=uniform,
        loss_range_bits=best["loss_range_bits"], log_prior_nats=best["log_prior_nats"],
        coded_bits=coded, train_tokens=m_val, sample_tokens=s_val, vocab_size=v, delta=delta,
        extra_bits=extra, alpha_cost=alpha_cost, sampling=kind, chosen_among=grid,
        choice_cost=cost, level=level, design=design, sample_reuse=reuse,
        label=f"{name} bound ({cost}; {design_text(design, s_val, kind)})",
        candidates=tuple(candidates),
    )
    return mark_validity(result, alpha_cost=alpha_cost, grid=grid, s=s_val, r=best["r"], delta=delta,
                       prior_caveat=prior_caveat)


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
    sample_design: str = "tokens",
    sample_reuse: int = 1,
) -> TokenBound:
    """Token-level bound on the average conditional risk (bits per token), spec section 3.

    ``empirical_bits``: ``{alpha: mean smoothed loss in bits over the s sampled tokens}`` (or one
    float with ``alpha=...``). ``coded_bits``: raw code length C of the model (2 log2 C and
    ``extra_bits`` are added here). ``sample_tokens=None`` means every training token was
    evaluated (no sampling term, r = 1). ``sampling="bernstein"`` needs ``variance_bits``
    (unbiased sample variance per alpha, bits^2). ``sample_design="units"``: the sample is
    ``sample_tokens`` window-unit draws and ``empirical_bits`` / ``variance_bits`` are the mean
    and variance of the drawn units' mean losses (``UnitStats.mean_bits`` / ``variance_bits``).
    ``sample_reuse``: see the module docstring. Example (lotfi-code, m = 8009762, s = 1e4,
    C = 1e5, extra 7, V = 50257, Rhat = 5): 7.255739 at alpha = 1e-4, 6.219056 at 0.5 (the
    official formula: ``valid=False`` since the smoothing choice is unpaid in the sampling term).
    """
    return _level_bound(
        empirical_bits, coded_bits=coded_bits, m=train_tokens, s=sample_tokens,
        vocab_size=vocab_size, delta=delta, extra_bits=extra_bits, alpha_cost=alpha_cost,
        sampling=sampling, alpha=alpha, variance_bits=variance_bits, level="token",
        sample_design=sample_design, sample_reuse=sample_reuse,
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
    error_variance: float | None = None,
    sample_design: str = "tokens",
    sample_reuse: int = 1,
) -> Bound:
    """Bound on the top-k error rate (spec section 3): the section-3 formula with Delta = 1, the
    empirical top-k error as Rhat and no smoothing cost. The Bernstein variant uses
    ``error_variance`` (the unbiased sample variance of the per-draw errors; for a window-unit
    sample, of the units' error rates: ``UnitStats.topk_error_variance``), by default the
    Bernoulli sample variance ``s/(s-1) e (1 - e)`` of a per-token sample. ``vacuous`` compares
    with the uniform predictor's error ``1 - k/V`` when ``k`` and ``vocab_size`` are given
    (else 1). Example: m = 8009762, s = 1e4, C = 1e5, extra 7, error 0.70 -> 0.778038202.
    """
    d = check_delta(delta)
    e = check_finite(error_rate, "error_rate")
    if not 0.0 <= e <= 1.0:
        raise ValueError(f"error_rate must lie in [0, 1], got {error_rate!r}")
    coded, prior_caveat = prior_bits(coded_bits)
    extra = check_nonneg(extra_bits, "extra_bits")
    kind = normalize_sampling(sampling)
    reuse = check_union_size(sample_reuse, "sample_reuse")
    m_val, s_val = check_sizes(train_tokens, sample_tokens, "train_tokens", "sample_tokens")
    design = design_of(s_val, sample_design)
    variance = None
    if s_val is not None and kind == "bernstein":
        if s_val < 2:
            raise ValueError("sampling='bernstein' needs at least 2 sampled tokens")
        if error_variance is not None:
            variance = check_nonneg(error_variance, "error_variance")
        elif design == "units":
            raise ValueError("a window-unit sample needs error_variance (UnitStats.topk_error_variance)")
        else:
            variance = s_val / (s_val - 1.0) * e * (1.0 - e)
    lp = log_prior_nats(coded, extra)
    comp, samp, r = hp_terms(loss_range=1.0, log_prior=lp, m=m_val, s=s_val, delta_complexity=d,
                             delta_sampling=d / reuse, sampling=kind, variance=variance)
    uniform = 1.0
    if k is not None and vocab_size is not None:
        v = check_vocab(vocab_size)
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        uniform = max(0.0, 1.0 - k / v)
    total = e + comp + samp
    name = f"top-{k} error" if k is not None else "top-k error"
    result = Bound(
        name=name, label=f"{name} bound ({design_text(design, s_val, kind)})",
        bound_bits=total, empirical_bits=e, complexity_bits=comp, sampling_bits=samp,
        vacuous=total > uniform, uniform_bits=uniform, delta=d, loss_range_bits=1.0,
        log_prior_nats=lp, units="error rate", alpha=None,
        inputs={"error_rate": e, "coded_bits": coded, "train_tokens": m_val,
                "sample_tokens": s_val, "delta": d, "extra_bits": extra, "sampling": kind,
                "k": k, "vocab_size": vocab_size, "r": r, "design": design,
                "error_variance": variance, "sample_reuse": reuse},
    )
    return mark_validity(result, alpha_cost="union", grid=1, s=s_val, r=r, delta=d,
                       prior_caveat=prior_caveat)

