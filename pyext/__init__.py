"""tokenbounds: non-vacuous token-level generalization bounds for LLMs, and the kernels that make
them cheap (fused smoothed log-loss, QuIP-style quantization, Hessian estimation).

Kernel API (stable): :func:`smoothed_nll`, :func:`linear_smoothed_nll`, :class:`LossStats`.
Bounds: :mod:`tokenbounds.bounds` (pure functions; importable without torch).

The kernels are loaded lazily on first use, so `import tokenbounds.bounds` (and LossStats, which
needs only numpy) works on a machine without torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .losses import DEFAULT_ALPHAS, TOPK, LossStats, TokenLosses, UnitStats

_LAZY = {
    "smoothed_nll": ("tokenbounds.ops.losses", "smoothed_nll"),
    "linear_smoothed_nll": ("tokenbounds.ops.losses", "linear_smoothed_nll"),
    "available_backends": ("tokenbounds.ops", "available_backends"),
    "hadamard_transform": ("tokenbounds.ops.hadamard", "hadamard_transform"),
    "patch_model": ("tokenbounds.eval.hf", "patch_model"),
}

__all__ = ["DEFAULT_ALPHAS", "TOPK", "LossStats", "TokenLosses", "UnitStats", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokenbounds' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
