"""Prequential code length, excess description length and the prequential information-content
estimate (spec section 8; Donoway et al., arXiv 2601.04728; Finzi et al. 2025)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import check_count, check_finite, check_nonneg
from .results import InformationEstimate, _ToDict

__all__ = [
    "EDLResult",
    "coupon_collector_edl_fraction",
    "excess_description_length",
    "prequential_code_length",
    "prequential_complexity_bits",
    "prequential_information_bits",
]


def _losses(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    if np.any(arr < 0):
        raise ValueError(f"{name} contains negative losses (log-losses are >= 0)")
    return arr


def prequential_code_length(losses_before_update: Any) -> float:
    """``MDL = sum_i l(theta_{i-1}; x_i)``: each example (or batch) coded by the model *before*
    it trains on it. Units are those of the losses (bits -> bits)."""
    return float(_losses(losses_before_update, "losses_before_update").sum())


@dataclass(frozen=True)
class EDLResult(_ToDict):
    """Excess description length ``EDL = MDL - n L_test(theta*)`` and its normalisations."""

    mdl: float
    edl: float
    num_examples: int
    test_loss: float
    edl_per_example: float
    edl_per_token: float | None
    edl_per_parameter: float | None


def excess_description_length(
    losses_before_update: Any,
    test_loss: float,
    *,
    num_tokens: float | None = None,
    num_parameters: float | None = None,
) -> EDLResult:
    """``EDL = sum_i l(theta_{i-1}; x_i) - n L_test(theta*)`` with theta* the final model and
    ``test_loss`` its held-out loss per example. Reported per example, per scored token
    (``num_tokens``) and per parameter (``num_parameters``). Example: losses
    [2.0, 1.5, 1.2, 1.0, 0.9], L_test = 0.8 -> EDL = 2.6.
    """
    arr = _losses(losses_before_update, "losses_before_update")
    lt = check_nonneg(test_loss, "test_loss")
    mdl = float(arr.sum())
    edl = mdl - arr.size * lt
    per_tok = None if num_tokens is None else edl / check_count(num_tokens, "num_tokens")
    per_par = None if num_parameters is None else edl / check_count(num_parameters, "num_parameters")
    return EDLResult(mdl=mdl, edl=edl, num_examples=int(arr.size), test_loss=lt,
                     edl_per_example=edl / arr.size, edl_per_token=per_tok,
                     edl_per_parameter=per_par)


def prequential_information_bits(
    losses_before_update: Any, losses_final_bits: Any, algorithm_bits: float = 0.0
) -> InformationEstimate:
    """Information-content **estimate** of a trained model from prequential coding (as Finzi et
    al. 2025 use it): ``MDL - sum_i l(theta_n; x_i) + K(algorithm)`` bits, losses in bits,
    ``losses_final_bits`` the final model's losses on the same stream.

    Not a code length: the relation ``K(h) <= MDL - sum_i l(theta_n; x_i) + K(alg)`` holds only
    up to O(log) terms and under assumptions that fail in general (the final model's code
    length given the data is not the sum of its losses), so it is not a valid log 1/P(h). A
    bound given it as ``coded_bits`` marks its result ``kind="heuristic"``, ``valid=False``.
    """
    before = _losses(losses_before_update, "losses_before_update")
    after = _losses(losses_final_bits, "losses_final_bits")
    if after.size != before.size:
        raise ValueError(
            f"losses_final_bits has {after.size} entries but losses_before_update has {before.size}"
        )
    k_alg = check_nonneg(algorithm_bits, "algorithm_bits")
    mdl, final = float(before.sum()), float(after.sum())
    return InformationEstimate(
        bits=max(0.0, mdl - final) + k_alg,
        source="prequential estimate MDL - sum l_final + K(alg) (Finzi et al. 2025)",
        details={"mdl_bits": mdl, "final_loss_bits": final, "algorithm_bits": k_alg},
    )


def prequential_complexity_bits(
    losses_before_update: Any, losses_final_bits: Any, algorithm_bits: float = 0.0
) -> InformationEstimate:
    """Deprecated name of :func:`prequential_information_bits` (it returns the same
    :class:`InformationEstimate`, no longer a float usable as a prior)."""
    warnings.warn("prequential_complexity_bits is deprecated: it is an information-content estimate, "
                  "not a code length; use prequential_information_bits", DeprecationWarning,
                  stacklevel=2)
    return prequential_information_bits(losses_before_update, losses_final_bits, algorithm_bits)


def coupon_collector_edl_fraction(u: float) -> float:
    """Toy model check: ``E[EDL] / (K Delta) = 1 - (1 + u) e^{-u}``, ``u = n / K`` (u = 1 ->
    0.264241): K facts each worth Delta, a fact costs Delta the first time it is seen."""
    uu = check_finite(u, "u")
    if uu < 0:
        raise ValueError(f"u must be >= 0, got {u!r}")
    return 1.0 - (1.0 + uu) * math.exp(-uu)
