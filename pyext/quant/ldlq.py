"""LDLQ / GPTQ rounding with lazy block updates, and round-to-nearest.

LDLQ (Chee et al. 2023, QuIP) rounds column k of W to Q(W_k + (W_<k - What_<k) a_k) with a_k
from the LDL decomposition H = (I + A)^T D (I + A); it equals OPTQ/GPTQ (Frantar et al. 2023):
with U the upper Cholesky factor of H^-1 (H^-1 = U^T U), after quantizing a group g of columns the
scaled error E = (W_g - Q_g) U_gg^-1 is fed to the later columns, W_rest -= E U_g,rest.
For a vector codebook over g = 8 columns this is the block LDL variant of QuIP# (feedback from
earlier groups only).

Cost (GPTQ's lazy batch, two levels). The feedback W_rest -= E U_g,rest of one group only has to
reach a column before that column is rounded, so it is deferred: inside a sub-block of ``inner``
columns the rank-g updates touch only the sub-block; the rest of the block of ``block_size``
columns gets one GEMM per sub-block; the rest of the matrix gets one GEMM per block. Every column
receives exactly the same sum of updates as in the column-by-column algorithm
(:func:`ldlq_reference`), only summed in another order. W is held transposed ([in, out], so a
column is contiguous) in ``dtype`` (float32 by default, as GPTQ does; the quantizer still sees
float64 columns and the errors are formed in float64), U in float64 for the factorization and in
``dtype`` for the updates. Per 4096 x 4096 layer: ~4096 small steps plus out * in^2 GEMM flops.
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


def _lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """L^-1 for lower-triangular L (float64): LAPACK trtri (n^3/3 flops) when scipy has it."""
    try:
        from scipy.linalg.lapack import dtrtri
    except ImportError:  # pragma: no cover - scipy is a dependency; keep a torch fallback
        eye = torch.eye(lower.shape[0], dtype=lower.dtype)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    inv, info = dtrtri(lower.numpy(), lower=1, overwrite_c=0)  # the zero upper triangle is kept
    if info != 0:
        raise RuntimeError(f"triangular inverse failed (LAPACK dtrtri info = {info})")
    return torch.from_numpy(inv)


def inverse_cholesky_upper(h: torch.Tensor, damp: float, *, max_tries: int = 6) -> torch.Tensor:
    """Upper U with (H + lambda I)^-1 = U^T U; lambda grows x10 on each failed Cholesky (float64).

    One Cholesky and one triangular inverse (2/3 n^3 flops instead of 4/3 n^3 for Cholesky,
    inverse, Cholesky): with J the reversal permutation and J H J = L L^T (lower L),
    H = M M^T for the upper M = J L J, so H^-1 = M^-T M^-1 and U = M^-1 = J L^-1 J, which is
    upper triangular with a positive diagonal, hence the (unique) upper Cholesky factor of H^-1.
    """
    h = h.to(torch.float64)
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    mean = float(torch.diagonal(h).mean().clamp_min(1e-300))
    extra = 0.0
    rev = h.flip(0, 1)
    for attempt in range(max_tries):
        l_fac, info = torch.linalg.cholesky_ex(rev + extra * mean * eye)
        if int(info) == 0:
            u = _lower_inverse(l_fac).flip(0, 1)
            if bool(torch.isfinite(u).all()):
                return u.contiguous()
        extra = damp * 10 ** (attempt + 1)
    raise RuntimeError(
        f"Cholesky of the damped Hessian failed after {max_tries} retries (last extra damping "
        f"{extra:g} x mean diag); the Hessian has NaN/inf entries or is badly scaled"
    )


def _check(w: torch.Tensor, u: torch.Tensor, group: int) -> None:
    n = w.shape[1]
    if tuple(u.shape) != (n, n):
        raise ValueError(f"u must be [in, in] = [{n}, {n}] (upper Cholesky factor of H^-1), got {tuple(u.shape)}")
    if group < 1 or n % group:
        raise ValueError(f"n = {n} must be a multiple of the codebook dimension {group}")


def ldlq(w: torch.Tensor, u: torch.Tensor, quantizer: Quantizer, *, group: int = 1,
         block_size: int = 128, inner: int = 16,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """LDLQ-round w [out, n] given U (upper Cholesky of H^-1); returns (values float64, codes int64).

    ``codes`` is contiguous; ``values`` is a transposed (column-major) view.

    Args:
        w: weight [out, n] (any float dtype; copied).
        u: upper-triangular U with H^-1 = U^T U, [n, n] (see :func:`inverse_cholesky_upper`).
        quantizer: rounds a group of columns; called once per group, left to right.
        group: codebook dimension (1 for scalar grids, 8 for E8); n must be a multiple of it.
        block_size, inner: outer and inner lazy-update block widths (rounded down to multiples
            of ``group``); they change the summation order only.
        dtype: working precision of W and of the update GEMMs (float32 or float64).
    """
    _check(w, u, group)
    out, n = w.shape
    block_size = max(group, block_size - block_size % group)
    inner = min(block_size, max(group, inner - inner % group))
    wt = w.detach().t().to(dtype).contiguous()  # [n, out]: a column of W is a contiguous row
    u64 = u.to(torch.float64)
    uw = u64.to(dtype)
    values_t = torch.empty((n, out), dtype=torch.float64)
    codes_t = torch.empty((n, out), dtype=torch.int64)
    err_t = torch.empty((block_size, out), dtype=dtype)
    if group == 1:
        inv_diag = (1.0 / torch.diagonal(u64)).tolist()
    threads = torch.get_num_threads()
    for i1 in range(0, n, block_size):
        i2 = min(n, i1 + block_size)
        # The ~block_size small steps run on one thread: on a busy machine, fork/join of an
        # OpenMP team for each tiny op can stall for a whole scheduler slice (measured 2.6 s vs
        # 33 s for a 4096 x 4096 layer). The trailing GEMM below uses every thread.
        torch.set_num_threads(1)
        try:
            _round_block(wt, uw, u64, quantizer, values_t, codes_t, err_t, i1, i2, inner, group,
                         inv_diag if group == 1 else None, dtype)
        finally:
            torch.set_num_threads(threads)
        if i2 < n:
            wt[i2:].addmm_(uw[i1:i2, i2:].t(), err_t[: i2 - i1], alpha=-1)
    return values_t.t(), codes_t.t().contiguous()  # values: a transposed view (callers rarely need it)


def _round_block(wt: torch.Tensor, uw: torch.Tensor, u64: torch.Tensor, quantizer: Quantizer,
                 values_t: torch.Tensor, codes_t: torch.Tensor, err_t: torch.Tensor, i1: int, i2: int,
                 inner: int, group: int, inv_diag: list[float] | None, dtype: torch.dtype) -> None:
    """Round columns i1..i2 of W (rows of wt), sub-block by sub-block; errors into err_t."""
    for j1 in range(i1, i2, inner):
        j2 = min(i2, j1 + inner)
        for j in range(j1, j2, group):
            g2 = j + group
            cols = wt[j:g2].t().to(torch.float64)  # [out, g]
            q, c = quantizer(cols, j)
            values_t[j:g2] = q.t()
            codes_t[j:g2] = c.t()
            if group == 1:
                e = ((cols[:, 0] - q[:, 0]) * inv_diag[j]).to(dtype)  # [out]
                if g2 < j2:
                    wt[g2:j2].addr_(uw[j, g2:j2], e, alpha=-1)
                err_t[j - i1] = e
            else:
                # E = (W_g - Q_g) U_gg^-1  <=>  U_gg^T E^T = (W_g - Q_g)^T
                et = torch.linalg.solve_triangular(u64[j:g2, j:g2].t(), (cols - q).t(), upper=False).to(dtype)
                if g2 < j2:
                    wt[g2:j2].addmm_(uw[j:g2, g2:j2].t(), et, alpha=-1)
                err_t[j - i1:g2 - i1] = et
        if j2 < i2:
            wt[j2:i2].addmm_(uw[j1:j2, j2:i2].t(), err_t[j1 - i1:j2 - i1], alpha=-1)


def ldlq_reference(w: torch.Tensor, u: torch.Tensor, quantizer: Quantizer, *,
                   group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-by-column LDLQ in float64 with immediate full-width updates (slow; the oracle).

    For each group g in order: Q_g = quantizer(W_g); E = (W_g - Q_g) U_gg^-1;
    W_{>g} -= E U_{g,>g}. :func:`ldlq` computes the same codes up to rounding ties.
    """
    _check(w, u, group)
    w = w.detach().to(torch.float64).clone()
    u = u.to(torch.float64)
    out, n = w.shape
    values = torch.empty_like(w)
    codes = torch.empty((out, n), dtype=torch.int64)
    for j in range(0, n, group):
        g2 = j + group
        q, c = quantizer(w[:, j:g2].clone(), j)
        values[:, j:g2] = q
        codes[:, j:g2] = c
        e = torch.linalg.solve_triangular(u[j:g2, j:g2], w[:, j:g2] - q, upper=True, left=False)
        w[:, g2:] -= e @ u[j:g2, g2:]
    return values, codes


def rtn(w: torch.Tensor, quantizer: Quantizer, *, group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Round every column group to its nearest codeword independently (the baseline)."""
    return quantizer(w, 0)
