"""Hessian trace and spectrum of a model's token loss, with error bars, and the QuIP link.

Operators (``matmat(V) -> H @ V``): :class:`ModelHessian`, :class:`GaussNewton`,
:class:`ProxyHessian` (layer H = X^T X / n, never formed), or any dense square tensor. The model
operators' ``quadratic_forms(V)`` (Hutchinson's z^T H z) use forward mode without forming H z
(:class:`TaylorTape`).
Estimators, each returning :class:`Estimate` (value, stderr, num_matvecs):
:func:`hutchinson_trace`, :func:`hutchpp_trace`, :func:`slq_trace`, :func:`spectral_density`.
QuIP link: :func:`collect_proxy_hessians` + :func:`quip_link_table`.
"""

from __future__ import annotations

from .estimators import (
    DenseOperator,
    Estimate,
    LinearOperator,
    SpectralDensity,
    as_operator,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    slq_trace,
    spectral_density,
)
from .operators import (
    GaussNewton,
    ModelHessian,
    ProxyHessian,
    collect_proxy_hessians,
    split_tokens,
    token_loss,
)
from .quip import format_table, quip_link_table, sqrt_trace_stats
from .taylor import TaylorTape, UnsupportedOp

__all__ = [
    "DenseOperator",
    "Estimate",
    "GaussNewton",
    "LinearOperator",
    "ModelHessian",
    "ProxyHessian",
    "SpectralDensity",
    "TaylorTape",
    "UnsupportedOp",
    "as_operator",
    "collect_proxy_hessians",
    "format_table",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "quip_link_table",
    "slq_trace",
    "spectral_density",
    "split_tokens",
    "sqrt_trace_stats",
    "token_loss",
]
