"""tokenbounds: non-vacuous token-level generalization bounds for LLMs, and the kernels that make
them cheap (fused smoothed log-loss, QuIP-style quantization, Hessian estimation).

Kernel API (stable): :func:`smoothed_nll`, :func:`linear_smoothed_nll`, :class:`LossStats`.
Bounds: :mod:`tokenbounds.bounds` (pure functions, no torch needed).
"""

from __future__ import annotations

__version__ = "0.1.0"

import torch  # noqa: F401  (the extension links against torch's libraries: import it first)

from .losses import DEFAULT_ALPHAS, TOPK, LossStats, TokenLosses
from .ops import available_backends, linear_smoothed_nll, smoothed_nll

__all__ = [
    "DEFAULT_ALPHAS",
    "TOPK",
    "LossStats",
    "TokenLosses",
    "available_backends",
    "linear_smoothed_nll",
    "smoothed_nll",
]


def __getattr__(name: str):
    # Kernels of other families are exported lazily so that `import tokenbounds` stays cheap and a
    # family under construction never breaks the others.
    if name == "hadamard_transform":
        from .ops.hadamard import hadamard_transform

        return hadamard_transform
    raise AttributeError(f"module 'tokenbounds' has no attribute {name!r}")
