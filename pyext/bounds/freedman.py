"""Empirical Freedman bound (structure of Finzi et al. 2025, arXiv 2504.15208; derivation in
spec ``bounds.md`` section 6).

Let X_k in [0, Delta] be the smoothed loss of token k shifted by its minimum
``-log2(1 - a + a/V)``, mu_k a predictable centering in [0, Delta] and
``psi(lambda) = -lambda - ln(1 - lambda)``. Fan, Grama & Liu (2012): for y >= -1 and
lambda in [0, 1), ``exp(lambda y - psi(lambda) y^2) <= 1 + lambda y``; with
y = -(X_k - mu_k)/Delta this makes ``exp(sum_k [lambda (E_k X_k - X_k)/Delta - psi(lambda)
((X_k - mu_k)/Delta)^2])`` a supermartingale. Ville's inequality plus a union over h (prior P)
and the lambda grid Lambda give, with probability >= 1 - delta, for all h and lambda:

    (1/m) sum_k E[X_k | past] - (1/m) sum_k X_k <= Delta [Cc / lambda + psi(lambda) S / lambda],
    Cc = (log 1/P(h) + ln(|Lambda| / delta)) / m,   S = (1/m) sum_k ((X_k - mu_k) / Delta)^2.

Centerings offered (all predictable):

* ``center="grid"`` (default): the constants c_j = (j + 1/2) Delta / K, j < K (``center_grid``
  = K), all in the union (ln K more nats in Cc), so the bound may use any of them, chosen after
  seeing the data.
* ``center=c`` (a float, bits, unshifted, fixed before seeing data, within the loss range).

How S is bounded, by sampling design:

* full pass (``sample_tokens=None``): S is exact; for the grid, the point nearest the mean.
* per-token sample (s uniform draws with replacement): for the grid, the point nearest to the
  m-token mean is within Delta / (2K) of it, so S <= V_m / Delta^2 + 1/(4 K^2) with V_m the
  population variance of the m losses, bounded from the s samples by Maurer & Pontil (2009)
  Thm 10; for a constant c, W = ((X - c)/Delta)^2 in [0, 1] is bounded by Hoeffding.
* window-unit sample (spec 3b, ``sample_design="units"``, ``unit_stats``): for each centering c,
  the drawn units' W(c) = unit mean of ((X - c)/Delta)^2 are i.i.d. in [0, 1] with mean S_c, so
  S_c is bounded above by Hoeffding or empirical Bernstein (the ``sampling`` kind) at the
  variance share of delta / K (a union over the K centerings); the bound takes the best c.
  ``UnitStats.sq_about(c)`` gives the mean and variance of W(c) over the draws in raw bits^2.

With a sample, delta is split three ways: r delta for the Freedman step (r = s / (s + m), as in
the token bound), and (1 - r) delta / 2 each for the mean's sampling term (Hoeffding or
empirical Bernstein) and for the bound on S. The smoothing level is paid for as in the token
bound (:func:`~.prior.smoothing_costs`): ``"union"`` runs every level at delta / G,
``"lotfi-code"`` leaves the sampling terms unpaid (``valid=False`` with a sample),
``"lotfi-code-corrected"`` runs them at their share / G.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._checks import (
    bound_inputs,
    check_choice,
    check_count,
    check_delta,
    check_finite,
    check_in_range,
    check_nonneg,
    design_text,
)
from ._stats import decode_unit_stats
from .coding import log_prior_nats
from .prior import (
    ALPHA_COSTS,
    loss_range_bits,
    min_loss_bits,
    smoothing_cost_text,
    smoothing_costs,
    uniform_loss_bits,
)
from .results import FreedmanBound, mark_validity
from .sampling import (
    bernstein_array,
    hoeffding_array,
    sampling_value,
    variance_upper_bound,
)

__all__ = ["LAMBDA_GRID", "freedman_bound", "freedman_gap", "psi"]

LAMBDA_GRID: np.ndarray = np.array(
    sorted({2.0**-j for j in range(1, 31)} | {1.0 - 2.0**-j for j in range(2, 31)})
)
"""The 59-point grid {2^-j : j = 1..30} U {1 - 2^-j : j = 2..30}."""


def psi(lam: Any) -> Any:
    """``psi(lambda) = -lambda - ln(1 - lambda)`` (= v(-lambda), v(x) = x - ln(1 + x))."""
    lam = np.asarray(lam, dtype=np.float64)
    return -lam - np.log1p(-lam)


_PSI_OVER_LAMBDA = psi(LAMBDA_GRID) / LAMBDA_GRID


def _min_over_grid(cc: float, s: float) -> tuple[float, float]:
    """``min over lambda of cc / lambda + psi(lambda) / lambda * s`` on the grid: (value, lambda)."""
    values = cc / LAMBDA_GRID + _PSI_OVER_LAMBDA * s
    j = int(np.argmin(values))
    return float(values[j]), float(LAMBDA_GRID[j])


def freedman_gap(
    log_prior_nats: float,
    n: float,
    scaled_variance: float,
    loss_range: float,
    delta: float = 0.05,
) -> tuple[float, float]:
    """``(gap, lambda)``: ``gap = Delta min_lambda [Cc / lambda + psi(lambda) S / lambda]`` over the
    59-point grid, ``Cc = (log_prior_nats + ln(59 / delta)) / n`` (no subsampling).

    Test vector: log 1/P = 1e7, n = 1e10, S = 0.0225, Delta = 10, delta = 0.05 ->
    gap = 0.0739138935 at lambda = 0.25.
    """
    lp = check_nonneg(log_prior_nats, "log_prior_nats")
    m = check_count(n, "n")
    s = check_nonneg(scaled_variance, "scaled_variance")
    rng = check_nonneg(loss_range, "loss_range")
    d = check_delta(delta)
    cc = (lp + math.log(LAMBDA_GRID.size / d)) / m
    value, lam = _min_over_grid(cc, s)
    return rng * value, lam


def _unit_w_moments(units, alphas: list[float], vocab: int, k_center: int,
                    center_value: float | None) -> dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per alpha: (centerings c in raw bits, mean and unbiased variance over the draws of the
    scaled W(c) = unit mean of ((X - c)/Delta)^2 in [0, 1]); one ``sq_about`` call for all."""
    lo = np.array([min_loss_bits(a, vocab) for a in units.alphas])
    rng = np.array([loss_range_bits(a, vocab) for a in units.alphas])
    if center_value is None:
        centers = lo[None, :] + (np.arange(k_center)[:, None] + 0.5) / k_center * rng[None, :]
    else:
        centers = np.full((1, len(units.alphas)), center_value)
    mean, var = units.sq_about(centers)
    out = {}
    for a in alphas:
        j = units.alphas.index(a)
        out[a] = (centers[:, j], mean[:, j] / rng[j] ** 2, var[:, j] / rng[j] ** 4)
    return out


def _unit_s_bounds(w_mean: np.ndarray, w_var: np.ndarray, s: float, delta_v: float, kind: str) -> np.ndarray:
    """Upper confidence bounds on S_c for every centering c from the i.i.d. W(c) of the s draws,
    each at ``delta_v / (number of centerings)`` (a union over the centerings)."""
    d_each = delta_v / w_mean.size
    if kind == "hoeffding":
        term = hoeffding_array(1.0, s, d_each)
    else:
        term = bernstein_array(1.0, s, d_each, w_var)
    return np.minimum(1.0, w_mean + term)


def freedman_bound(
    empirical_bits: Mapping[float, float] | float,
    *,
    variance_bits: Mapping[float, float] | float | None,
    coded_bits: float,
    train_tokens: float,
    sample_tokens: float | None,
    vocab_size: int,
    delta: float = 0.05,
    extra_bits: float = 0.0,
    alpha_cost: str = "union",
    sampling: str = "hoeffding",
    alpha: float | None = None,
    center: str | float = "grid",
    center_grid: int = 256,
    unsmoothed_bits: float | None = None,
    unquantized_bits: float | None = None,
    sample_design: str = "tokens",
    unit_stats: Any = None,
    sample_reuse: int = 1,
) -> FreedmanBound:
    """Empirical Freedman bound on the average conditional risk (bits per token).

    ``empirical_bits`` / ``variance_bits``: per smoothing level, the mean and the unbiased sample
    variance (bits^2) of the smoothed loss over the evaluated tokens (``LossStats.mean_bits``,
    ``LossStats.variance_bits``). ``sample_tokens=None``: all ``train_tokens`` were evaluated
    (no sampling terms, all of delta goes to the Freedman step). ``alpha_cost``: as in
    :func:`token_bound` (``"union"``: each level at delta / G). ``sampling`` selects the mean's
    sampling term (and, for a window-unit sample, the bound on S).

    ``sample_design="units"``: ``sample_tokens`` window-unit draws, ``unit_stats`` their
    :class:`~tokenbounds.UnitStats` (or its state dict), ``empirical_bits`` / ``variance_bits``
    its ``mean_bits`` / ``variance_bits`` (the variance of the unit means; only the empirical
    Bernstein mean term needs it).

    ``unsmoothed_bits`` (Lhat(h_q), the unsmoothed loss of the quantized model on the same
    tokens) and ``unquantized_bits`` (Lhat(h), the unquantized model's loss **on exactly the
    same tokens**, so the quantization gap is paired) enable Finzi et al.'s decomposition.
    ``sample_reuse``: see :func:`token_bound`.
    """
    inp = bound_inputs(empirical_bits=empirical_bits, variance_bits=variance_bits, alpha=alpha,
                       coded_bits=coded_bits, m=train_tokens, s=sample_tokens,
                       names=("train_tokens", "sample_tokens"), vocab_size=vocab_size, delta=delta,
                       extra_bits=extra_bits, alpha_cost=alpha_cost, alpha_costs=ALPHA_COSTS,
                       sampling=sampling, sample_design=sample_design, sample_reuse=sample_reuse)
    d, v, coded, prior_caveat, extra = inp.delta, inp.vocab_size, inp.coded_bits, inp.prior_caveat, inp.extra_bits
    kind, reuse, m, s, design = inp.sampling, inp.sample_reuse, inp.m, inp.s, inp.design
    emp, var, alphas = inp.empirical, inp.variance, inp.alphas
    units = None
    if design == "units":
        if unit_stats is None:
            raise ValueError("sample_design='units' needs unit_stats (the UnitStats of the drawn units)")
        units = decode_unit_stats(unit_stats)
        if units.draws != s:
            raise ValueError(f"sample_tokens={sample_tokens!r} but unit_stats holds {units.draws} draws")
        unit_means = units.mean_bits
        for a in alphas:
            if a not in unit_means:
                raise ValueError(f"unit_stats has no smoothing level {a} (it has {units.alphas})")
            if not math.isclose(emp[a], unit_means[a], rel_tol=1e-9, abs_tol=1e-12):
                raise ValueError(f"empirical_bits[{a}]={emp[a]!r} is not unit_stats' mean of unit means "
                                 f"{unit_means[a]!r}: pass unit_stats.mean_bits")
        if kind == "bernstein" and var is None:
            raise ValueError("sampling='bernstein' needs variance_bits (unit_stats.variance_bits)")
        w_moments = None  # computed below, once the centering is known
    elif unit_stats is not None and s is not None:
        raise ValueError("unit_stats is given but sample_design is 'tokens'; pass sample_design='units'")
    elif var is None:
        raise ValueError("freedman_bound needs variance_bits (unbiased sample variance per alpha)")
    n_eval = m if s is None else s
    if n_eval < 2:
        raise ValueError("freedman_bound needs at least 2 evaluated tokens")
    if isinstance(center, str):
        check_choice(center, "center", ("grid",))
        if isinstance(center_grid, bool) or int(center_grid) != center_grid or center_grid < 1:
            raise ValueError(f"center_grid must be a positive integer, got {center_grid!r}")
        k_center = int(center_grid)
        center_value = None
    else:
        center_value = check_finite(center, "center")
        k_center = 1
    grid = len(alphas)
    candidates = []
    for a in alphas:
        lo, rng = min_loss_bits(a, v), loss_range_bits(a, v)
        check_in_range(emp[a], lo, lo + rng, f"empirical_bits[{a}]")
        if center_value is not None:
            check_in_range(center_value, lo, lo + rng, "center")
    if units is not None and s is not None:
        w_moments = _unit_w_moments(units, alphas, v, k_center, center_value)
    for i, (a, (cost_bits, div_c, div_s)) in enumerate(zip(alphas, smoothing_costs(alpha_cost, grid),
                                                           strict=True), start=1):
        rng = loss_range_bits(a, v)
        lo = min_loss_bits(a, v)
        lp = log_prior_nats(coded, extra + cost_bits)
        xbar = emp[a] - lo  # shifted mean, in [0, Delta]
        if center_value is None:
            centers = lo + (np.arange(k_center) + 0.5) / k_center * rng  # raw bits
        else:
            centers = np.array([center_value])
        if s is None:
            split = {"freedman": d / div_c, "mean": 0.0, "variance": 0.0}
            samp = 0.0
            pop_var = var[a] * (n_eval - 1.0) / n_eval  # variance with 1/n normalisation
            if center_value is None:
                j = min(int(np.floor(np.clip(xbar / rng, 0.0, 1.0) * k_center)), k_center - 1)
                s_cands = np.array([(pop_var + (emp[a] - centers[j]) ** 2) / rng**2])
                centers = centers[j:j + 1]
            else:
                s_cands = np.array([(pop_var + (emp[a] - center_value) ** 2) / rng**2])
        else:
            r = s / (s + m)
            share = (1 - r) * d / (2 * div_s * reuse)
            split = {"freedman": r * d / div_c, "mean": share, "variance": share}
            samp = sampling_value(kind, rng, s, split["mean"], None if var is None else var[a])
            if design == "units":
                centers, w_mean, w_var = w_moments[a]
                s_cands = _unit_s_bounds(w_mean, w_var, s, split["variance"], kind)
            elif center_value is None:
                # the grid point nearest the m-token mean: S <= V_m / Delta^2 + 1/(4 K^2)
                v_ub = variance_upper_bound(rng, s, split["variance"], var[a])
                s_cands = np.array([v_ub / rng**2 + 1.0 / (4.0 * k_center**2)])
                centers = np.array([math.nan])  # data-dependent (nearest to the unknown mean)
            else:
                pop_var = var[a] * (n_eval - 1.0) / n_eval
                w_bar = (pop_var + (emp[a] - center_value) ** 2) / rng**2
                s_cands = np.array([min(1.0, w_bar + math.sqrt(math.log(1.0 / split["variance"]) / (2.0 * s)))])
        cc = (lp + math.log(LAMBDA_GRID.size * k_center / split["freedman"])) / m
        # psi(lambda) / lambda > 0: for every lambda the best centering is the one with least S
        j = int(np.argmin(s_cands))
        value, lam = _min_over_grid(cc, float(s_cands[j]))
        comp = rng * cc / lam
        var_term = rng * value - comp
        gap = rng * value
        candidates.append({
            "alpha": a, "index": i, "loss_range_bits": rng, "empirical_bits": emp[a],
            "extra_bits": extra + cost_bits, "delta": d / div_c, "delta_split": split,
            "log_prior_nats": lp, "cc": cc, "scaled_variance": float(s_cands[j]),
            "center_bits": float(centers[j]), "lambda": lam,
            "sampling_bits": samp, "complexity_bits": comp, "variance_bits": var_term,
            "gap_bits": gap, "bound_bits": emp[a] + samp + gap,
        })
    best = min(candidates, key=lambda c: c["bound_bits"])
    uniform = uniform_loss_bits(v)
    decomposition: dict[str, float] = {}
    if unsmoothed_bits is not None:
        lq = check_finite(unsmoothed_bits, "unsmoothed_bits")
        decomposition["unsmoothed_quantized_bits"] = lq
        decomposition["smoothing_cost_bits"] = best["empirical_bits"] - lq
        if unquantized_bits is not None:
            lh = check_finite(unquantized_bits, "unquantized_bits")
            decomposition["unquantized_bits"] = lh
            decomposition["quantization_gap_bits"] = lq - lh
    elif unquantized_bits is not None:
        raise ValueError("unquantized_bits needs unsmoothed_bits (the quantized model's loss) too")
    if decomposition:
        decomposition["sampling_bits"] = best["sampling_bits"]
        decomposition["generalization_gap_bits"] = best["gap_bits"]
    cost = smoothing_cost_text(alpha_cost, grid)
    center_text = (f"grid of {k_center} centerings" if center_value is None
                   else f"constant {center_value!r} bits")
    result = FreedmanBound(
        bound_bits=best["bound_bits"], alpha=best["alpha"], lam=best["lambda"],
        empirical_bits=best["empirical_bits"], sampling_bits=best["sampling_bits"],
        gap_bits=best["gap_bits"], complexity_bits=best["complexity_bits"],
        variance_bits=best["variance_bits"], scaled_variance=best["scaled_variance"],
        vacuous=best["bound_bits"] > uniform, uniform_bits=uniform,
        loss_range_bits=best["loss_range_bits"], log_prior_nats=best["log_prior_nats"],
        coded_bits=coded, train_tokens=m, sample_tokens=s, vocab_size=v, delta=d,
        delta_split=best["delta_split"], extra_bits=extra, alpha_cost=alpha_cost, sampling=kind,
        center="grid" if center_value is None else f"constant {center_value!r} bits",
        chosen_among=grid, choice_cost=cost,
        parameters_per_token_nats=best["log_prior_nats"] / m,
        design=design, sample_reuse=reuse,
        label=(f"empirical Freedman bound ({cost}; {center_text}; "
               f"{design_text(design, s, kind)})"),
        decomposition=decomposition, candidates=tuple(candidates),
    )
    r_best = 1.0 if s is None else s / (s + m)
    return mark_validity(result, alpha_cost=alpha_cost, grid=grid, s=s, r=r_best, delta=d,
                         prior_caveat=prior_caveat)
