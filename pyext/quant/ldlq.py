"""LDLQ / GPTQ rounding with lazy block updates, and round-to-nearest.

LDLQ (Chee et al. 2023, QuIP) rounds column k of W to Q(W_k + (W_<k - What_<k) a_k) with a_k
from the LDL decomposition of H; it equals OPTQ/GPTQ (Frantar et al. 2023). With U the upper
Cholesky factor of H^-1 (H^-1 = U^T U), GPTQ feeds the scaled error E = (W_g - Q_g) U_gg^-1 of
each group g of columns to the later ones, W_rest -= E U_g,rest (:func:`ldlq_reference`). Since
W - Q = E U, E = (W - Q) M with M = U^-1 the upper factor of H = M M^T, and the column that
gets rounded is

    W~_g = W_g + (W - Q)_<g B_<g,g,   B_<g,g = M_<g,g M_gg^-1

(for scalar grids, g = 1: B_ik = M_ik / M_kk). So :func:`ldlq` needs only the Cholesky factor M
(:func:`cholesky_upper`, n^3/3 flops), not U (one more triangular inverse, 2/3 n^3), and feeds
back the plain rounding errors W - Q of the original weights. For a vector codebook over
g = 8 columns this is the block LDL variant of QuIP# (feedback from earlier groups only).

Cost (GPTQ's lazy batch, two levels). The feedback of one group only has to reach a column
before that column is rounded, so it is deferred: inside a sub-block of ``inner`` columns the
rank-g updates touch only the sub-block; the rest of the block of ``block_size`` columns gets one
GEMM per sub-block; the rest of the matrix gets one GEMM per block. Every column receives the
same sum of updates as in the column-by-column algorithm, only summed in another order. W is held
transposed ([in, out], so a column is contiguous) in ``dtype`` (float32 by default, as GPTQ does;
the quantizer still sees float64 columns and the errors are formed in float64). Per 4096 x 4096
layer: ~4096 small steps plus out * in^2 GEMM flops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Quantizer = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""quantizer(columns [out, g] float64, first_column) -> (values [out, g], codes [out, g] int64)."""


def damped_hessian(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H + damp * mean(diag H) I (float32 or float64 as given, else float64), with dead inputs
    (diag 0) given a unit diagonal.

    Returns (H_damped, dead mask). Columns of W that read a dead input do not affect the output.
    """
    h = h.clone() if h.dtype in (torch.float32, torch.float64) else h.to(torch.float64)
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    mean = float(diag[~dead].to(torch.float64).mean()) if bool((~dead).any()) else 1.0
    diag += damp * mean
    return h, dead


def _lower_inverse(lower: torch.Tensor, base: int = 256) -> torch.Tensor:
    """L^-1 for lower-triangular L, by blocks: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]].

    About 2/3 n^3 flops, all but the small diagonal blocks in matrix products (which use every
    thread; LAPACK's trtri from scipy ran on one and was slower in float32 than in float64).
    """
    n = lower.shape[0]
    if n <= base:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype), upper=False)
    k = n // 2
    a_inv = _lower_inverse(lower[:k, :k], base)
    c_inv = _lower_inverse(lower[k:, k:], base)
    out = torch.zeros_like(lower)
    out[:k, :k] = a_inv
    out[k:, k:] = c_inv
    out[k:, :k] = torch.mm(c_inv, torch.mm(lower[k:, :k], a_inv)).neg_()
    return out


def cholesky_upper(h: torch.Tensor, damp: float, *, max_tries: int = 6,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Upper M with H + lambda I = M M^T (lambda = 0 first, then x10 damping on each failure).

    With J the reversal permutation and J H J = L L^T (lower L), M = J L J. ``dtype`` is the
    precision of the factorization (float32 is twice as fast, as GPTQ uses); with float32, a
    factorization that fails is first redone in float64 at the same lambda, so lower precision
    never buys more damping. Returns M in the precision that succeeded.
    """
    mean = float(torch.diagonal(h).to(torch.float64).mean().clamp_min(1e-300))
    extra = 0.0
    for attempt in range(max_tries):
        for dt in dict.fromkeys((dtype, torch.float64)):
            rev = h.flip(0, 1).to(dt)
            if extra:
                rev.diagonal().add_(extra * mean)
            l_fac, info = torch.linalg.cholesky_ex(rev)
            del rev
            diag = torch.diagonal(l_fac)  # a NaN/inf anywhere reaches the later diagonal entries
            if int(info) == 0 and bool(torch.isfinite(diag).all()) and bool((diag > 0).all()):
                return l_fac.flip(0, 1).contiguous()
        extra = damp * 10 ** (attempt + 1)
    raise RuntimeError(
        f"Cholesky of the damped Hessian failed after {max_tries} retries (last extra damping "
        f"{extra:g} x mean diag); the Hessian has NaN/inf entries or is badly scaled"
    )


def inverse_cholesky_upper(h: torch.Tensor, damp: float, *, max_tries: int = 6,
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Upper U with (H + lambda I)^-1 = U^T U (the factor GPTQ uses; :func:`ldlq_reference`).

    U = M^-1 for M of :func:`cholesky_upper` (H = M M^T gives H^-1 = M^-T M^-1), which is
    upper triangular with a positive diagonal, hence the (unique) upper Cholesky factor of H^-1.
    """
    m = cholesky_upper(h, damp, max_tries=max_tries, dtype=dtype)
    u = _lower_inverse(m.flip(0, 1)).flip(0, 1)
    if not bool(torch.isfinite(u).all()):
        raise RuntimeError("the inverse of the Cholesky factor is not finite; the Hessian is badly scaled")
    return u.contiguous()


def feedback_matrix(m: torch.Tensor, group: int = 1) -> torch.Tensor:
    """B with B_<g,g = M_<g,g M_gg^-1 for each group g of ``group`` columns, zero on and below
    the diagonal blocks (in M's dtype): the weights with which LDLQ feeds rounding errors forward."""
    n = m.shape[0]
    if group == 1:
        return torch.triu(m / torch.diagonal(m)[None, :], diagonal=1)
    blocks = torch.stack([m[j:j + group, j:j + group] for j in range(0, n, group)]).to(torch.float64)
    inv = torch.linalg.solve_triangular(blocks, torch.eye(group, dtype=torch.float64).expand_as(blocks), upper=True)
    b = torch.einsum("inj,njk->ink", m.reshape(n, n // group, group), inv.to(m.dtype)).reshape(n, n)
    mask = torch.arange(n) // group
    return b.masked_fill_(mask[:, None] >= mask[None, :], 0.0)


def _check(w: torch.Tensor, f: torch.Tensor, group: int, name: str, meaning: str) -> None:
    n = w.shape[1]
    if tuple(f.shape) != (n, n):
        raise ValueError(f"{name} must be [in, in] = [{n}, {n}] ({meaning}), got {tuple(f.shape)}")
    if group < 1 or n % group:
        raise ValueError(f"n = {n} must be a multiple of the codebook dimension {group}")


def ldlq(w: torch.Tensor, m: torch.Tensor, quantizer: Quantizer, *, group: int = 1,
         block_size: int = 128, inner: int = 16,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """LDLQ-round w [out, n] given M (upper, H = M M^T); returns (values float64, codes int64).

    ``codes`` is contiguous; ``values`` is a transposed (column-major) view.

    Args:
        w: weight [out, n] (any float dtype; copied).
        m: upper-triangular M with H = M M^T, [n, n] (see :func:`cholesky_upper`).
        quantizer: rounds a group of columns; called once per group, left to right.
        group: codebook dimension (1 for scalar grids, 8 for E8); n must be a multiple of it.
        block_size, inner: outer and inner lazy-update block widths (rounded down to multiples
            of ``group``); they change the summation order only.
        dtype: working precision of W and of the update GEMMs (float32 or float64).
    """
    _check(w, m, group, "m", "upper factor of H = M M^T")
    out, n = w.shape
    block_size = max(group, block_size - block_size % group)
    inner = min(block_size, max(group, inner - inner % group))
    wt = w.detach().t().to(dtype).contiguous()  # [n, out]: a column of W is a contiguous row
    orig_t = wt.clone()
    b = feedback_matrix(m, group).to(dtype)
    values_t = torch.empty((n, out), dtype=torch.float64)
    codes_t = torch.empty((n, out), dtype=torch.int64)
    err_t = torch.empty((block_size, out), dtype=dtype)
    threads = torch.get_num_threads()
    for i1 in range(0, n, block_size):
        i2 = min(n, i1 + block_size)
        # The ~block_size small steps run on one thread: on a busy machine, fork/join of an
        # OpenMP team for each tiny op can stall for a whole scheduler slice (measured 2.6 s vs
        # 33 s for a 4096 x 4096 layer). The trailing GEMM below uses every thread.
        torch.set_num_threads(1)
        try:
            _round_block(wt, orig_t, b, quantizer, values_t, codes_t, err_t, i1, i2, inner, group)
        finally:
            torch.set_num_threads(threads)
        if i2 < n:
            wt[i2:].addmm_(b[i1:i2, i2:].t(), err_t[: i2 - i1])
    return values_t.t(), codes_t.t().contiguous()  # values: a transposed view (callers rarely need it)


def _round_block(wt: torch.Tensor, orig_t: torch.Tensor, b: torch.Tensor, quantizer: Quantizer,
                 values_t: torch.Tensor, codes_t: torch.Tensor, err_t: torch.Tensor, i1: int, i2: int,
                 inner: int, group: int) -> None:
    """Round columns i1..i2 of W (rows of wt), sub-block by sub-block; errors W - Q into err_t."""
    for j1 in range(i1, i2, inner):
        j2 = min(i2, j1 + inner)
        for j in range(j1, j2, group):
            g2 = j + group
            q, c = quantizer(wt[j:g2].t().to(torch.float64), j)  # [out, g]
            values_t[j:g2] = q.t()
            codes_t[j:g2] = c.t()
            et = (orig_t[j:g2].to(torch.float64) - q.t()).to(dtype=err_t.dtype)  # [g, out]
            if g2 < j2:
                if group == 1:
                    wt[g2:j2].addr_(b[j, g2:j2], et[0])
                else:
                    wt[g2:j2].addmm_(b[j:g2, g2:j2].t(), et)
            err_t[j - i1:g2 - i1] = et
        if j2 < i2:
            wt[j2:i2].addmm_(b[j1:j2, j2:i2].t(), err_t[j1 - i1:j2 - i1])


def ldlq_reference(w: torch.Tensor, u: torch.Tensor, quantizer: Quantizer, *,
                   group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-by-column LDLQ in float64 with immediate full-width updates (slow; the oracle).

    For each group g in order: Q_g = quantizer(W_g); E = (W_g - Q_g) U_gg^-1;
    W_{>g} -= E U_{g,>g}. :func:`ldlq` computes the same codes up to rounding ties.
    """
    _check(w, u, group, "u", "upper Cholesky factor of H^-1")
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
