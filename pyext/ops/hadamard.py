"""Fast Hadamard transform along the last dimension: validation and dispatch.

y = scale * H_n x for every row x, with H_n = H_K (x) H_{2^k} (n = K * 2^k, K in
:data:`tokenbounds.quant.hadamard_matrices.SUPPORTED_BASES`; 40 * 2^k counts as 20 * 2^(k+1)).
The default scale 1/sqrt(n) makes the transform orthogonal. The randomized transform
(QuIP#, Tseng et al. 2024) multiplies by a sign vector drawn from ``seed`` first:
y = scale * H_n diag(s) x; its exact inverse is x = diag(s) H_n^T y / (scale * n).
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from .. import reference
from ..quant.hadamard_matrices import (
    SUPPORTED_BASES,
    base_hadamard,
    hadamard_factor,
    next_supported_size,
    random_signs,
)
from ._dispatch import resolve_backend

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
OP_NAME = "hadamard_transform"
CUDA_MAX_N = 49152  # csrc/cuda/hadamard.cu kMaxSharedFloats; longer rows (and float64) use Triton


@functools.cache
def _hk_cpu(k: int, transpose: bool) -> torch.Tensor:
    h = torch.from_numpy(base_hadamard(k).astype("float32"))
    return (h.t() if transpose else h).contiguous()


def _hk(k: int, transpose: bool, device: torch.device) -> torch.Tensor:
    h = _hk_cpu(k, transpose)
    return h if device.type == "cpu" else h.to(device)


@functools.lru_cache(maxsize=64)
def _signs_cpu(n: int, seed: int, stream: int) -> torch.Tensor:
    return torch.from_numpy(random_signs(n, seed, stream).astype("float32"))


def hadamard_signs(n: int, seed: int, *, stream: int = 0, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The sign vector diag(s) of the randomized transform for (n, seed, stream)."""
    return _signs_cpu(int(n), int(seed), int(stream)).to(device=device, dtype=dtype)


def _check_size(n: int) -> tuple[int, int]:
    fac = hadamard_factor(n)
    if fac is None:
        odd = n
        while odd and odd % 2 == 0:
            odd //= 2
        extra = f" (no Hadamard construction for K = {4 * odd} here)" if odd and n % (4 * odd) == 0 else ""
        raise ValueError(
            f"x.shape[-1] = {n} is not K * 2^k for a supported K in {SUPPORTED_BASES}{extra}; "
            f"pad the last dimension to {next_supported_size(n)} (tokenbounds.quant.next_supported_size)"
        )
    return fac


def _run(x2d: torch.Tensor, hk: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    if backend == "reference":
        return reference.hadamard_transform_reference(x2d, hk, scale)
    if backend == "triton" or (backend == "cuda" and (x2d.dtype == torch.float64 or x2d.shape[1] > CUDA_MAX_N)):
        from ..triton_kernels.hadamard import hadamard_transform_triton

        return hadamard_transform_triton(x2d, hk, scale)
    return torch.ops.tokenbounds.hadamard_transform(x2d, hk, float(scale))


def hadamard_transform(
    x: torch.Tensor,
    *,
    scale: float | None = None,
    seed: int | None = None,
    inverse: bool = False,
    stream: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Hadamard transform of the last dimension: y = scale * H_n diag(s) x (s = 1 without seed).

    Args:
        x: [..., n] float32 / bfloat16 / float16 / float64, n = K * 2^k with K in
            (1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172) (pad other sizes to
            :func:`tokenbounds.quant.next_supported_size`).
        scale: multiplier (default 1/sqrt(n): an orthogonal transform).
        seed: if given, the randomized transform with signs s drawn from (seed, stream) by a
            counter-based generator (store the seed, not the signs).
        inverse: apply the exact inverse of the forward transform with the same scale/seed:
            x = diag(s) H_n^T y / (scale * n).
        backend: "cuda", "triton", "cpu" or "reference" (default: automatic).

    Returns a tensor of x's shape and dtype (computed in float32, float64 for float64 inputs).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16, float16 or float64, got {x.dtype}; cast with .float()")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the transformed last dimension)")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"x has an empty last dimension (shape {tuple(x.shape)})")
    k, _ = _check_size(n)
    if scale is None:
        scale = 1.0 / math.sqrt(n)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"scale must be finite and nonzero, got {scale}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    if isinstance(stream, bool) or not isinstance(stream, numbers.Integral) or stream < 0:
        raise ValueError(f"stream must be a non-negative int, got {stream!r}")
    if not isinstance(inverse, bool):
        raise TypeError(f"inverse must be a bool, got {type(inverse).__name__}")
    chosen = resolve_backend(OP_NAME, x.device, backend)

    shape = x.shape
    x2d = x.reshape(-1, n)
    signs = None
    if seed is not None:
        signs = hadamard_signs(n, seed, stream=stream, device=x.device, dtype=x.dtype)
        if not inverse:
            x2d = x2d * signs
    x2d = x2d.contiguous()
    eff_scale = 1.0 / (scale * n) if inverse else scale
    if x2d.shape[0] == 0:
        return x.clone()
    y = _run(x2d, _hk(k, inverse, x.device), eff_scale, chosen)
    if signs is not None and inverse:
        y = y * signs
    return y.reshape(shape)
