"""Proxy-Hessian accumulation X^T X and Rademacher probe products: validation and dispatch.

* :func:`gram_accumulate_` adds the upper triangle of X^T X into an fp32/fp64 accumulator (the
  layer proxy Hessian of QuIP/GPTQ, H = X^T X / n, summed over batches of layer inputs X).
* :func:`rademacher_matmul` computes X @ Z for Rademacher probes Z that the kernel regenerates
  from a counter-based hash (``csrc/include/tokenbounds/gram.h``), so Z is never stored: the
  Hutchinson estimate of tr(X^T X) is sum_c ||X z_c||^2 / k.
* :func:`rademacher_probes` materialises the same Z (identical bits on every backend).
"""

from __future__ import annotations

import numbers

import torch

from .. import reference
from ._dispatch import resolve_backend

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ACC_DTYPES = (torch.float32, torch.float64)
MASK32 = 0xFFFFFFFF
MAX_SEED = 2**63 - 1


# ----------------------------------------------------------------------------- the hash, in torch
def probe_key(seed: int) -> tuple[int, int]:
    """(row_key, col_key) of tokenbounds::gram::probe_key for a 64-bit seed (host side)."""
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    row_key = reference.mix32_int(lo ^ 0x9E3779B9)
    col_key = reference.mix32_int(((hi + 0x85EBCA6B) & MASK32) ^ row_key)
    return row_key, col_key


def _mix32_torch(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic on values < 2^32: products wrap mod 2^64, the mask keeps the low 32 bits.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def _probes_torch(d: int, k: int, seed: int, offset: int, dtype, device) -> torch.Tensor:
    row_key, col_key = probe_key(seed)
    rows = torch.arange(d, dtype=torch.int64, device=device)
    cols = torch.arange(offset, offset + k, dtype=torch.int64, device=device) & MASK32
    rs = _mix32_torch(rows ^ row_key)
    h = _mix32_torch(rs[:, None] ^ cols[None, :] ^ col_key)
    h = _mix32_torch((h + 0x632BE5AB) & MASK32)
    return torch.where(h >= 2**31, -1.0, 1.0).to(dtype)


# ----------------------------------------------------------------------------- validation helpers
def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        upper = "" if hi is None else f" and <= {hi}"
        raise ValueError(f"{name} must be >= {lo}{upper}, got {value}")
    return value


def _check_x(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}; cast it with .float()")
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [rows, d] (flatten leading dimensions with x.reshape(-1, x.shape[-1])), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[0] and x.stride(1) != 1:
        x = x.contiguous()
    return x


def _check_probe_args(k, seed, offset) -> tuple[int, int, int]:
    k = _check_int("k", k, 0)
    seed = _check_int("seed", seed, 0, MAX_SEED)
    offset = _check_int("offset", offset, 0, 2**32 - 1)
    if offset + k > 2**32:
        raise ValueError(f"offset + k = {offset + k} exceeds 2^32 probe columns; use another seed instead")
    return k, seed, offset


# ----------------------------------------------------------------------------- public API
def rademacher_probes(
    d: int,
    k: int,
    *,
    seed: int = 0,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backend: str | None = None,
) -> torch.Tensor:
    """Rademacher probe matrix Z [d, k], Z[i, c] = +-1 from hash(seed, i, offset + c).

    Columns are independent of k: ``rademacher_probes(d, 8, offset=8)`` are the columns 8..15 of
    ``rademacher_probes(d, 16)``, so probes can be produced block by block.
    """
    d = _check_int("d", d, 0, 2**32)
    k, seed, offset = _check_probe_args(k, seed, offset)
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    device = torch.device(device)
    chosen = resolve_backend("rademacher_matmul", device, backend)
    if chosen == "cpu" and dtype in ACC_DTYPES:
        return torch.ops.tokenbounds.rademacher_probes(d, k, seed, offset, dtype)
    if chosen == "reference":
        return reference.rademacher_probes_reference(d, k, seed, offset).to(device=device, dtype=dtype)
    return _probes_torch(d, k, seed, offset, dtype, device)


def rademacher_matmul(
    x: torch.Tensor, k: int, *, seed: int = 0, offset: int = 0, backend: str | None = None
) -> torch.Tensor:
    """X @ Z for Rademacher probes Z = rademacher_probes(d, k, seed=seed, offset=offset), Z never stored.

    Returns float64 for float64 x, float32 otherwise (products accumulate in that type).
    Hutchinson (1989) for the proxy Hessian H = X^T X / n: tr(H) ~ sum_c ||X z_c||^2 / (n k).
    """
    x = _check_x(x)
    k, seed, offset = _check_probe_args(k, seed, offset)
    chosen = resolve_backend("rademacher_matmul", x.device, backend)
    if chosen == "reference":
        return reference.rademacher_matmul_reference(x, k, seed, offset)
    if chosen == "triton":
        from ..triton_kernels.gram import rademacher_matmul_triton

        return rademacher_matmul_triton(x, probe_key(seed), offset, k)
    return torch.ops.tokenbounds.rademacher_matmul(x, seed, offset, k)


def gram_accumulate_(acc: torch.Tensor, x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """In place: acc[i, j] += sum_r x[r, i] x[r, j] for j >= i (the strict lower triangle is untouched).

    Args:
        acc: [d, d] float32 or float64 accumulator (the sum of X^T X over batches; divide by the
            number of rows for the proxy Hessian H = X^T X / n of QuIP, Chee et al. 2023).
        x: [rows, d] float32 / bfloat16 / float16 / float64 layer inputs.
    Use :func:`symmetrize_upper` (or :func:`gram`) to get the full matrix.
    """
    x = _check_x(x)
    if not isinstance(acc, torch.Tensor):
        raise TypeError(f"acc must be a torch.Tensor, got {type(acc).__name__}")
    if acc.dtype not in ACC_DTYPES:
        raise TypeError(f"acc must be float32 or float64 (the accumulation type), got {acc.dtype}")
    d = x.shape[1]
    if tuple(acc.shape) != (d, d):
        raise ValueError(f"acc.shape {tuple(acc.shape)} must be (d, d) with d = x.shape[1] = {d}")
    if acc.device != x.device:
        raise ValueError(f"acc is on {acc.device} but x is on {x.device}; move them to one device")
    if acc.dim() == 2 and d and acc.stride(1) != 1:
        raise ValueError("acc must have unit column stride (e.g. a contiguous tensor): it is updated in place")
    if acc.requires_grad:
        raise ValueError("acc must not require grad (it is updated in place); pass acc.detach()")
    chosen = resolve_backend("gram_accumulate_", x.device, backend)
    if x.shape[0] == 0 or d == 0:
        return acc
    if chosen == "reference":
        acc.copy_(reference.gram_accumulate_reference(acc, x).to(acc.dtype))
    elif chosen == "triton":
        from ..triton_kernels.gram import gram_accumulate_triton

        gram_accumulate_triton(acc, x)
    else:
        torch.ops.tokenbounds.gram_accumulate_(acc, x)
    return acc


def symmetrize_upper(acc: torch.Tensor) -> torch.Tensor:
    """Full symmetric matrix from its upper triangle: triu(A) + triu(A, 1)^T."""
    upper = torch.triu(acc)
    return upper + torch.triu(acc, 1).T


def gram(x: torch.Tensor, *, acc_dtype: torch.dtype = torch.float32, backend: str | None = None) -> torch.Tensor:
    """Symmetric X^T X [d, d] in ``acc_dtype``, computing only one triangle."""
    x = _check_x(x)
    if acc_dtype not in ACC_DTYPES:
        raise TypeError(f"acc_dtype must be float32 or float64, got {acc_dtype}")
    acc = torch.zeros((x.shape[1], x.shape[1]), dtype=acc_dtype, device=x.device)
    return symmetrize_upper(gram_accumulate_(acc, x, backend=backend))
