"""Backend selection shared by every kernel family (DESIGN.md, "Dispatch").

CUDA tensor -> CUDA extension kernel if built, else Triton; CPU tensor -> C++ CPU kernel; if the
extension is missing -> the reference path with a one-time warning. ``backend=`` or the
environment variable ``TOKENBOUNDS_BACKEND`` forces one of "cuda", "triton", "cpu", "reference".
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")


@functools.cache
def extension():
    """The compiled extension module, or None when it is not built."""
    try:
        from .. import _C  # noqa: F401
    except ImportError as err:  # pragma: no cover - exercised only without a build
        warnings.warn(
            f"tokenbounds._C is not built ({err}); falling back to the slow float64 reference "
            "kernels. Run `make build` (or `pip install --no-build-isolation -e .`) to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    from ._fakes import register_all

    register_all()
    return _C


def has_op(name: str, device_type: str) -> bool:
    """True when torch.ops.tokenbounds.<name> has a kernel for ``device_type``."""
    if extension() is None:
        return False
    try:
        op = getattr(torch.ops.tokenbounds, name)
    except (AttributeError, RuntimeError):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), key)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(op_name: str, device: torch.device, backend: str | None) -> str:
    """Pick the backend for one call, validating a forced choice with an actionable error."""
    backend = backend or os.environ.get("TOKENBOUNDS_BACKEND") or None
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "cuda" and not (device.type == "cuda" and has_op(op_name, "cuda")):
            raise ValueError(
                f"backend='cuda' needs CUDA tensors and a CUDA build of tokenbounds._C "
                f"(tensors are on {device}, CUDA kernel built: {has_op(op_name, 'cuda')})"
            )
        if backend == "cpu" and not (device.type == "cpu" and has_op(op_name, "cpu")):
            raise ValueError(
                f"backend='cpu' needs CPU tensors and the built extension "
                f"(tensors are on {device}, CPU kernel built: {has_op(op_name, 'cpu')})"
            )
        if backend == "triton" and not triton_runs_on(device):
            raise ValueError(
                "backend='triton' needs triton installed and CUDA tensors, or CPU tensors with "
                "TRITON_INTERPRET=1 set before triton is imported"
            )
        return backend
    if device.type == "cuda":
        if has_op(op_name, "cuda"):
            return "cuda"
        if triton_available():
            return "triton"
        return "reference"
    if device.type == "cpu" and has_op(op_name, "cpu"):
        return "cpu"
    return "reference"


def available_backends(op_name: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run ``op_name`` on ``device`` on this machine (for tests/benchmarks)."""
    device = torch.device(device)
    out = []
    if device.type == "cuda" and has_op(op_name, "cuda"):
        out.append("cuda")
    if triton_runs_on(device):
        out.append("triton")
    if device.type == "cpu" and has_op(op_name, "cpu"):
        out.append("cpu")
    out.append("reference")
    return out
