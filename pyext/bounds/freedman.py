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
  = K), all in the union (ln K more nats in Cc). The grid point nearest to the stream's mean is
  within Delta / (2K) of it, so S <= V_m / Delta^2 + 1/(4 K^2) with V_m the population variance
  of the m losses; V_m is known exactly after a full pass, else bounded from the s samples by
  Maurer & Pontil (2009) Thm 10.
* ``center=c`` (a float, bits, unshifted, fixed before seeing data, within the loss range):
  S = (V_m + (mean_m - c)^2) / Delta^2; with subsampling W = ((X - c)/Delta)^2 in [0, 1] is
  bounded by Hoeffding.

(A running-mean centering or the model's own expected smoothed loss would need per-token
statistics that LossStats does not keep.)

With subsampling (s uniform draws with replacement), delta is split three ways: r delta for
the Freedman step (r = s / (s + m), as in the token bound), and (1 - r) delta / 2 each for the
mean's sampling term (Hoeffding or empirical Bernstein) and for the bound on S.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .coding import log_prior_nats
from .prior import loss_range_bits, min_loss_bits, uniform_loss_bits
from .results import (
    FreedmanBound,
    check_choice,
    check_count,
    check_delta,
    check_finite,
    check_nonneg,
    check_vocab,
)
from .sampling import normalize_sampling, sampling_term, variance_upper_bound
from .token import ALPHA_COSTS, _as_alpha_map, _as_variance_map, _check_in_range, _check_sizes

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


def _as_optional_map(values: Any, alphas: list[float], name: str) -> dict[float, float] | None:
    if values is None:
        return None
    if isinstance(values, Mapping):
        return {float(a): check_finite(v, f"{name}[{a}]") for a, v in values.items()}
    return {a: check_finite(values, name) for a in alphas}


def freedman_bound(
    empirical_bits: Mapping[float, float] | float,
    *,
    variance_bits: Mapping[float, float] | float,
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
) -> FreedmanBound:
    """Empirical Freedman bound on the average conditional risk (bits per token).

    ``empirical_bits`` / ``variance_bits``: per smoothing level, the mean and the unbiased sample
    variance (bits^2) of the smoothed loss over the evaluated tokens (``LossStats.mean_bits``,
    ``LossStats.variance_bits``). ``sample_tokens=None``: all ``train_tokens`` were evaluated
    (no sampling terms, all of delta goes to the Freedman step). ``alpha_cost``: as in
    :func:`token_bound` (``"union"``: each level at delta / G). ``sampling`` selects the mean's
    sampling term. ``unsmoothed_bits`` (Lhat(h_q), unsmoothed loss of the quantized model on the
    same tokens) and ``unquantized_bits`` (Lhat(h)) enable Finzi et al.'s decomposition.
    """
    d = check_delta(delta)
    v = check_vocab(vocab_size)
    coded = check_nonneg(coded_bits, "coded_bits")
    extra = check_nonneg(extra_bits, "extra_bits")
    check_choice(alpha_cost, "alpha_cost", ALPHA_COSTS)
    kind = normalize_sampling(sampling)
    m, s = _check_sizes(train_tokens, sample_tokens, "train_tokens", "sample_tokens")
    emp = _as_alpha_map(empirical_bits, alpha, "empirical_bits")
    alphas = list(emp)
    var = _as_variance_map(variance_bits, alphas, "variance_bits")
    if var is None:
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
    for i, a in enumerate(alphas, start=1):
        rng = loss_range_bits(a, v)
        lo = min_loss_bits(a, v)
        _check_in_range(emp[a], lo, lo + rng, f"empirical_bits[{a}]")
        if alpha_cost == "union":
            cost_bits, d_c = 0.0, d / grid
        else:
            cost_bits, d_c = 8.0 * i, d
        lp = log_prior_nats(coded, extra + cost_bits)
        pop_var = var[a] * (n_eval - 1.0) / n_eval  # variance with 1/n normalisation
        xbar = emp[a] - lo  # shifted mean, in [0, Delta]
        if s is None:
            split = {"freedman": d_c, "mean": 0.0, "variance": 0.0}
            samp = 0.0
            if center_value is None:
                cj = (np.floor(np.clip(xbar / rng, 0.0, 1.0 - 1e-15) * k_center) + 0.5) / k_center * rng
                s_scaled = (pop_var + (xbar - cj) ** 2) / rng**2
            else:
                _check_in_range(center_value, lo, lo + rng, "center")
                s_scaled = (pop_var + (emp[a] - center_value) ** 2) / rng**2
        else:
            r = s / (s + m)
            split = {"freedman": r * d_c, "mean": (1 - r) * d_c / 2, "variance": (1 - r) * d_c / 2}
            samp = sampling_term(kind, rng, s, split["mean"], var[a])
            if center_value is None:
                v_ub = variance_upper_bound(rng, s, split["variance"], var[a])
                s_scaled = v_ub / rng**2 + 1.0 / (4.0 * k_center**2)
            else:
                _check_in_range(center_value, lo, lo + rng, "center")
                w_bar = (pop_var + (emp[a] - center_value) ** 2) / rng**2
                s_scaled = min(1.0, w_bar + math.sqrt(math.log(1.0 / split["variance"]) / (2.0 * s)))
        cc = (lp + math.log(LAMBDA_GRID.size * k_center / split["freedman"])) / m
        value, lam = _min_over_grid(cc, s_scaled)
        comp = rng * cc / lam
        var_term = rng * value - comp
        gap = rng * value
        candidates.append({
            "alpha": a, "index": i, "loss_range_bits": rng, "empirical_bits": emp[a],
            "extra_bits": extra + cost_bits, "delta": d_c, "delta_split": split,
            "log_prior_nats": lp, "cc": cc, "scaled_variance": s_scaled, "lambda": lam,
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
    cost = (f"union over {grid} smoothing levels: each at delta/{grid}" if alpha_cost == "union"
            else f"lotfi-code: 8 i extra bits for the i-th of {grid} levels")
    return FreedmanBound(
        bound_bits=best["bound_bits"], alpha=best["alpha"], lam=best["lambda"],
        empirical_bits=best["empirical_bits"], sampling_bits=best["sampling_bits"],
        gap_bits=best["gap_bits"], complexity_bits=best["complexity_bits"],
        variance_bits=best["variance_bits"], scaled_variance=best["scaled_variance"],
        vacuous=best["bound_bits"] > uniform, uniform_bits=uniform,
        loss_range_bits=best["loss_range_bits"], log_prior_nats=best["log_prior_nats"],
        coded_bits=coded, train_tokens=m, sample_tokens=s, vocab_size=v, delta=d,
        delta_split=best["delta_split"], extra_bits=extra, alpha_cost=alpha_cost, sampling=kind,
        center="grid" if center_value is None else f"constant {center_value!r} bits",
        chosen_among=grid,
        choice_cost=cost if grid > 1 or alpha_cost == "lotfi-code" else "none (one level)",
        parameters_per_token_nats=best["log_prior_nats"] / m,
        decomposition=decomposition, candidates=tuple(candidates),
    )
