"""Compute and scaling helpers (spec section 8): training FLOPs, the Chinchilla rules, and power-law
fits of a bound (or gap) against model size with confidence intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import check_count, check_nonneg
from .results import _ToDict

__all__ = [
    "CHINCHILLA",
    "PowerLawFit",
    "chinchilla_loss_nats",
    "chinchilla_tokens",
    "compute_optimal",
    "fit_power_law",
    "training_flops",
]

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
"""Hoffmann et al. 2022, approach 3: L(N, D) = E + A / N^alpha + B / D^beta (nats per token)."""


def training_flops(num_parameters: float, num_tokens: float) -> float:
    """``C ~ 6 N D`` FLOPs (forward 2ND + backward 4ND). D counts tokens (the data points),
    not tokens times the sequence length."""
    return 6.0 * check_nonneg(num_parameters, "num_parameters") * check_nonneg(num_tokens, "num_tokens")


def chinchilla_tokens(num_parameters: float, tokens_per_parameter: float = 20.0) -> float:
    """Chinchilla rule of thumb ``D ~ 20 N``."""
    return check_nonneg(tokens_per_parameter, "tokens_per_parameter") * check_nonneg(
        num_parameters, "num_parameters")


def chinchilla_loss_nats(num_parameters: float, num_tokens: float) -> float:
    """``L(N, D) = 1.69 + 406.4 / N^0.34 + 410.7 / D^0.28`` nats per token (Hoffmann et al. 2022)."""
    n = check_count(num_parameters, "num_parameters")
    d = check_count(num_tokens, "num_tokens")
    c = CHINCHILLA
    return c["E"] + c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"]


def compute_optimal(flops: float, *, method: str = "rule") -> tuple[float, float]:
    """Compute-optimal ``(N, D)`` for a budget of ``flops`` with ``C = 6 N D``.

    ``method="rule"``: D = 20 N, so N = sqrt(C / 120). ``method="fit"``: minimise the Chinchilla
    loss fit subject to 6ND = C: ``N = G (C/6)^(beta/(alpha+beta))``,
    ``G = (alpha A / (beta B))^(1/(alpha+beta))`` (Hoffmann et al. 2022, eq. 4).
    """
    c_val = check_count(flops, "flops", minimum=1e-300)
    if method == "rule":
        n = math.sqrt(c_val / 120.0)
        return n, 20.0 * n
    if method == "fit":
        p = CHINCHILLA
        g = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1.0 / (p["alpha"] + p["beta"]))
        n = g * (c_val / 6.0) ** (p["beta"] / (p["alpha"] + p["beta"]))
        return n, c_val / (6.0 * n)
    raise ValueError(f"method must be 'rule' or 'fit', got {method!r}")


@dataclass(frozen=True)
class PowerLawFit(_ToDict):
    """``y = prefactor * x^exponent`` fitted by least squares in log-log space, with
    ``confidence``-level t intervals for the exponent and the prefactor."""

    exponent: float
    prefactor: float
    exponent_ci: tuple[float, float]
    prefactor_ci: tuple[float, float]
    r_squared: float
    num_points: int
    confidence: float

    def predict(self, x: Any) -> Any:
        return self.prefactor * np.asarray(x, dtype=np.float64) ** self.exponent


def fit_power_law(x: Any, y: Any, *, confidence: float = 0.95) -> PowerLawFit:
    """Fit ``log y = log a + b log x`` (ordinary least squares) and return a, b and their
    Student-t confidence intervals (``scipy.stats.linregress`` standard errors, n - 2 dof)."""
    from scipy import stats

    xs = np.asarray(x, dtype=np.float64).reshape(-1)
    ys = np.asarray(y, dtype=np.float64).reshape(-1)
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must have the same length, got {xs.size} and {ys.size}")
    if xs.size < 3:
        raise ValueError("fit_power_law needs at least 3 points for a confidence interval")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise ValueError("x and y must be finite (no NaN/inf)")
    if np.any(xs <= 0) or np.any(ys <= 0):
        raise ValueError("x and y must be > 0 for a power-law (log-log) fit")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    lx, ly = np.log(xs), np.log(ys)
    res = stats.linregress(lx, ly)
    t = stats.t.ppf(0.5 + confidence / 2.0, xs.size - 2)
    b, a = float(res.slope), float(res.intercept)
    b_se, a_se = float(res.stderr), float(res.intercept_stderr)
    return PowerLawFit(
        exponent=b, prefactor=math.exp(a),
        exponent_ci=(b - t * b_se, b + t * b_se),
        prefactor_ci=(math.exp(a - t * a_se), math.exp(a + t * a_se)),
        r_squared=float(res.rvalue**2), num_points=int(xs.size), confidence=confidence,
    )
