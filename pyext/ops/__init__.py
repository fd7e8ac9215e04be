"""Public kernel API: input validation and backend dispatch (DESIGN.md "One rule per layer").

One module per kernel family (losses, hadamard, gram, ...) so the families stay independent;
`tokenbounds.ops.<name>` re-exports the stable entry points.
"""

from __future__ import annotations

from ._dispatch import available_backends as _available_backends
from ._dispatch import extension as _extension
from .losses import linear_smoothed_nll, smoothed_nll

_extension()  # loads tokenbounds._C and registers the fake kernels of its ops (ops/_fakes.py)


def available_backends(op_name: str = "smoothed_nll", device="cpu") -> list[str]:
    """Backends that can run ``op_name`` on ``device`` here: a subset of cuda/triton/cpu/reference."""
    return _available_backends(op_name, device)


__all__ = ["available_backends", "linear_smoothed_nll", "smoothed_nll"]
