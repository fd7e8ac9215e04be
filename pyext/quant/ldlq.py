"""LDLQ / GPTQ rounding with block-buffered error feedback, and round-to-nearest.

LDLQ (Chee et al. 2023, QuIP) rounds column k of W to Q(W_k + (W_<k - What_<k) a_k) with a_k
from the LDL decomposition H = (I + A)^T D (I + A); it equals OPTQ/GPTQ (Frantar et al. 2023):
with U the upper Cholesky factor of H^-1 (H^-1 = U^T U), after quantizing a group g of columns the
scaled error E = (W_g - Q_g) U_gg^-1 is fed to the later columns, W_rest -= E U_g,rest.
For a vector codebook over g = 8 columns this is the block LDL variant of QuIP# (feedback from
earlier blocks only). Updates inside a block of ``block_size`` columns are applied one group at a
time; the rest of the matrix is updated once per block with one GEMM (the lazy batch of GPTQ).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Quantizer = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""quantizer(columns [out, g] float64, first_column) -> (values [out, g], codes [out, g] int64)."""


def damped_hessian(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H + damp * mean(diag H) I in float64, with dead inputs (diag 0) given a unit diagonal.

    Returns (H_damped, dead mask). Columns of W that read a dead input do not affect the output.
    """
    h = h.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag += damp * mean
    return h, dead


def inverse_cholesky_upper(h: torch.Tensor, damp: float, *, max_tries: int = 6) -> torch.Tensor:
    """Upper U with (H + lambda I)^-1 = U^T U; lambda grows x10 on each failed Cholesky (float64)."""
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    mean = float(torch.diagonal(h).mean().clamp_min(1e-300))
    extra = 0.0
    for attempt in range(max_tries):
        l_fac, info = torch.linalg.cholesky_ex(h + extra * mean * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l_fac)
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0:
                return u
        extra = damp * 10 ** (attempt + 1)
    raise RuntimeError(
        f"Cholesky of the damped Hessian failed after {max_tries} retries (last extra damping "
        f"{extra:g} x mean diag); the Hessian has NaN/inf entries or is badly scaled"
    )


def ldlq(w: torch.Tensor, u: torch.Tensor, quantizer: Quantizer, *, group: int = 1,
         block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """LDLQ-round w [out, n] (float64) given U (upper Cholesky of H^-1); returns (values, codes)."""
    w = w.clone()
    out, n = w.shape
    if n % group:
        raise ValueError(f"n = {n} must be a multiple of the codebook dimension {group}")
    block_size = max(group, block_size - block_size % group)
    values = torch.empty_like(w)
    codes = torch.empty((out, n), dtype=torch.int64)
    for i1 in range(0, n, block_size):
        i2 = min(n, i1 + block_size)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j in range(0, i2 - i1, group):
            cols = w1[:, j:j + group]
            q, c = quantizer(cols, i1 + j)
            values[:, i1 + j:i1 + j + group] = q
            codes[:, i1 + j:i1 + j + group] = c
            if group == 1:
                e = (cols - q) / u1[j, j]
            else:
                # E = (W_g - Q_g) U_gg^-1  <=>  E U_gg = W_g - Q_g
                e = torch.linalg.solve_triangular(u1[j:j + group, j:j + group], cols - q, upper=True, left=False)
            w1[:, j + group:] -= e @ u1[j:j + group, j + group:]
            err1[:, j:j + group] = e
        if i2 < n:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return values, codes


def rtn(w: torch.Tensor, quantizer: Quantizer, *, group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Round every column group to its nearest codeword independently (the baseline)."""
    return quantizer(w, 0)
