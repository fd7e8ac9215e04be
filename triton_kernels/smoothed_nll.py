"""Triton kernels for the fused softmax + prediction smoothing + log-loss (tokenbounds::smoothed_nll).

Mirrors the element math of ``csrc/include/tokenbounds/smoothed_loss.h``. A row of logits
x_0..x_{V-1} with target y is summarised by (m = max_j x_j, s = sum_j exp(x_j - m), x_y) and
rank = #{j : x_j > x_y}; then log p_y = x_y - m - log s and, for every smoothing level a
(Lotfi et al. 2024, prediction smoothing p_a = (1 - a) p + a / V),

    nll_bits = -logaddexp(log(1 - a) + log p_y, log(a / V)) / ln 2,

evaluated in float64 from the per-call constants log_keep = log(1 - a), log_floor = log(a / V)
that every backend receives (computed once by ``tokenbounds.ops.losses.smoothing_constants``;
tensors, never scalar arguments, so the kernels run under ``TRITON_INTERPRET=1``; no libdevice
calls).

* :func:`smoothed_nll_triton`: one program per row, a loop over the vocabulary in BLOCK chunks with
  the online max / sum-of-exp merge (Milakov & Gimelshein 2018) and the greater-than count.
* :func:`linear_smoothed_nll_triton`: the logits ``hidden @ weight.T`` are never materialised.
  (1) the target logit of every token is one dot product (+ bias); (2) a tiled matmul (BLOCK_N rows x
  BLOCK_V vocabulary columns, ``tl.dot`` over D) reduces each tile to per-row partials
  (max, sum of exp, count greater) written to a buffer [N, num_vtiles]; (3) a second pass merges
  the partials per row. No locks (cut-cross-entropy's design minus its spin lock); extra memory
  is O(N * V / BLOCK_V), and rows are chunked to stay under ``max_bytes``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["linear_smoothed_nll_triton", "smoothed_nll_triton"]


@triton.jit
def _finish_rows(rows, row_mask, valid, bad, x_t, m, s, count, log_keep_ptr, log_floor_ptr,
                 nll_ptr, logp_ptr, rank_ptr, NUM_ALPHAS: tl.constexpr, ALPHA_BLOCK: tl.constexpr):
    """log p_y and the smoothed losses of a block of rows from their merged states (float64)."""
    inv_ln2: tl.constexpr = 1.4426950408889634
    x_t64 = x_t.to(tl.float64)
    m64 = m.to(tl.float64)
    s64 = s.to(tl.float64)
    # s >= 1 whenever m is finite (the max element contributes exp(0)); guard the empty row.
    logp = (x_t64 - m64) - tl.log(tl.where(s64 > 0.0, s64, 1.0))
    logp = tl.where(x_t64 == -float("inf"), -float("inf"), logp)
    is_nan = bad | (m64 == -float("inf"))  # NaN / +inf logit, or no finite logit
    logp = tl.where(is_nan, float("nan"), logp)

    a_offs = tl.arange(0, ALPHA_BLOCK)
    a_mask = a_offs < NUM_ALPHAS
    log_keep = tl.load(log_keep_ptr + a_offs, mask=a_mask, other=0.0)
    log_floor = tl.load(log_floor_ptr + a_offs, mask=a_mask, other=0.0)
    u = log_keep[None, :] + tl.where(is_nan, 0.0, logp)[:, None]
    v = log_floor[None, :] + tl.zeros_like(u)
    hi = tl.where(u > v, u, v)
    lo = tl.where(u > v, v, u)
    both_zero = hi == -float("inf")  # a = 0 and p_y = 0
    diff = tl.where(both_zero, 0.0, lo - hi)
    # log1p(e) as log(1 + e): exact enough in float64 for a float32 result (0 <= e <= 1).
    nll = -(hi + tl.log(1.0 + tl.exp(diff))) * inv_ln2
    nll = tl.where(both_zero, float("inf"), nll)
    nll = tl.where(is_nan[:, None], float("nan"), nll)
    nll = tl.where(valid[:, None], nll, 0.0)
    out_mask = row_mask[:, None] & a_mask[None, :]
    tl.store(nll_ptr + rows[:, None] * NUM_ALPHAS + a_offs[None, :], nll.to(tl.float32),
             mask=out_mask)
    tl.store(logp_ptr + rows, tl.where(valid, logp, 0.0).to(tl.float32), mask=row_mask)
    tl.store(rank_ptr + rows, tl.where(valid, count, 0).to(tl.int32), mask=row_mask)


@triton.jit
def _smoothed_nll_rows_kernel(logits_ptr, row_stride, targets_ptr, log_keep_ptr, log_floor_ptr,
                              nll_ptr, logp_ptr, rank_ptr, n, vocab, ignore_index,
                              NUM_ALPHAS: tl.constexpr, ALPHA_BLOCK: tl.constexpr,
                              ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # ROWS = 1 on GPU (one program per row); the CPU interpreter batches rows to amortise its
    # per-operation overhead.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n
    y = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (y != ignore_index)
    row_ptr = logits_ptr + rows * row_stride
    x_t = tl.load(row_ptr + tl.where(valid, y, 0), mask=valid, other=0.0).to(tl.float32)
    m = tl.full((ROWS,), -float("inf"), tl.float32)
    s = tl.zeros((ROWS,), tl.float32)
    count = tl.zeros((ROWS,), tl.int32)
    bad = tl.zeros((ROWS,), tl.int32)
    end = tl.where(tl.max(valid.to(tl.int32), axis=0) > 0, vocab, 0)  # skip ignored rows
    offs = tl.arange(0, BLOCK)
    for start in range(0, end, BLOCK):
        cols = start + offs
        mask = valid[:, None] & (cols < vocab)[None, :]
        x = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=-float("inf"))
        x = x.to(tl.float32)
        count += tl.sum((x > x_t[:, None]).to(tl.int32), axis=1)
        bad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), axis=1)
        m_new = tl.maximum(m, tl.max(tl.where(x == x, x, -float("inf")), axis=1))
        live = m_new != -float("inf")
        m_safe = tl.where(live, m_new, 0.0)
        scale = tl.where(m == -float("inf"), 0.0, tl.exp(m - m_safe))
        p = tl.where(live[:, None], tl.exp(x - m_safe[:, None]), 0.0)
        s = s * scale + tl.sum(p, axis=1)
        m = m_new
    _finish_rows(rows, row_mask, valid, bad > 0, x_t, m, s, count, log_keep_ptr, log_floor_ptr,
                 nll_ptr, logp_ptr, rank_ptr, NUM_ALPHAS, ALPHA_BLOCK)


def _outputs(n: int, num_alphas: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.empty((n, num_alphas), dtype=torch.float32, device=device),
        torch.empty((n,), dtype=torch.float32, device=device),
        torch.empty((n,), dtype=torch.int32, device=device),
    )


def smoothed_nll_triton(
    logits2d: torch.Tensor,
    targets1d: torch.Tensor,
    log_keep: torch.Tensor,
    log_floor: torch.Tensor,
    vocab_size: int,
    ignore_index: int,
    *,
    block: int | None = None,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backend of ``tokenbounds.smoothed_nll`` on validated 2-D input.

    Args:
        logits2d: [N, V_padded] float32/bfloat16/float16 with unit column stride (row stride free).
        targets1d: [N] int64 (validated: in [0, vocab_size) or ignore_index).
        log_keep, log_floor: [A] float64 log(1 - a) and log(a / V), on the logits' device.
        vocab_size: the true V (columns >= V are ignored).
        block: vocabulary chunk per loop step (power of two; default 4096 on GPU, 2048 on CPU).
        rows_per_program: rows per program (power of two; default 1 on GPU, 16 under the CPU
            interpreter, whose cost is per operation).

    Returns:
        (nll_bits float32 [N, A], logp float32 [N] natural log p_y, rank int32 [N]).
    """
    n = logits2d.shape[0]
    num_alphas = int(log_keep.numel())
    nll_bits, logp, rank = _outputs(n, num_alphas, logits2d.device)
    if n == 0:
        return nll_bits, logp, rank
    if logits2d.stride(1) != 1:
        logits2d = logits2d.contiguous()
    targets1d = targets1d.to(torch.int64).contiguous()
    on_gpu = logits2d.is_cuda
    if block is None:
        block = 4096 if on_gpu else 2048
    block = max(16, min(block, triton.next_power_of_2(vocab_size)))
    rows = rows_per_program or (1 if on_gpu else 16)
    _smoothed_nll_rows_kernel[(triton.cdiv(n, rows),)](
        logits2d, logits2d.stride(0), targets1d, log_keep, log_floor, nll_bits, logp, rank,
        n, vocab_size, ignore_index,
        NUM_ALPHAS=num_alphas, ALPHA_BLOCK=max(2, triton.next_power_of_2(num_alphas)),
        ROWS=rows, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return nll_bits, logp, rank


# ------------------------------------------------------------------ fused linear + smoothed loss


@triton.jit
def _target_logit_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, out_ptr, n, d, ignore_index,
                         HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """x_y = <hidden_i, weight_{y_i}> (+ bias_{y_i}) in float32, BLOCK_T tokens per program (0 for
    ignored rows)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < n
    y = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (y != ignore_index)
    y = tl.where(valid, y, 0)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in range(0, d, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        kmask = ks < d
        m2 = valid[:, None] & kmask[None, :]
        h = tl.load(hidden_ptr + rows[:, None] * d + ks[None, :], mask=m2, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + y[:, None] * d + ks[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(h * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + y, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, acc, mask=row_mask)


@triton.jit
def _linear_tile_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, target_logit_ptr,
                        pmax_ptr, psum_ptr, pcnt_ptr, n, d, vocab, num_vtiles, ignore_index,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        GROUP_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr):
    """One [BLOCK_N, BLOCK_V] logit tile -> per-row (max, sum exp(x - max), #{x > x_y}) partials."""
    pid = tl.program_id(0)
    num_ntiles = tl.cdiv(n, BLOCK_N)
    # Grouped ordering (as in the Triton matmul tutorial): GROUP_N row tiles sweep the vocabulary
    # together, so a weight tile is reused from L2 by several row tiles.
    per_group = GROUP_N * num_vtiles
    group = pid // per_group
    first_n = group * GROUP_N
    group_size = tl.minimum(num_ntiles - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n
    col_mask = cols < vocab
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, d, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        kmask = ks < d
        h = tl.load(hidden_ptr + rows[:, None] * d + ks[None, :],
                    mask=row_mask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * d + ks[None, :],
                    mask=col_mask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:
            # The interpreter's tl.dot multiplies bfloat16 bit patterns; its products are exact
            # in float32 anyway.
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    x = tl.where(col_mask[None, :], acc, -float("inf"))
    y = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    x_t = tl.load(target_logit_ptr + rows, mask=row_mask, other=0.0)
    # The target's own column is never counted: its tile value may differ from the separately
    # computed x_y by rounding (another summation order).
    greater = (x > x_t[:, None]) & (cols[None, :] != y[:, None])
    cnt = tl.sum(greater.to(tl.int32), axis=1)
    m = tl.max(tl.where(x == x, x, -float("inf")), axis=1)
    live = m != -float("inf")
    m_safe = tl.where(live, m, 0.0)
    p = tl.where(live[:, None], tl.exp(x - m_safe[:, None]), 0.0)
    s = tl.sum(p, axis=1)
    # A NaN logit must reach the merge even when the whole tile is NaN (then m = -inf).
    s = tl.where(tl.sum((x != x).to(tl.int32), axis=1) > 0, float("nan"), s)
    out = rows * num_vtiles + pid_v
    tl.store(pmax_ptr + out, m, mask=row_mask)
    tl.store(psum_ptr + out, s, mask=row_mask)
    tl.store(pcnt_ptr + out, cnt, mask=row_mask)


@triton.jit
def _linear_merge_kernel(pmax_ptr, psum_ptr, pcnt_ptr, targets_ptr, target_logit_ptr,
                         log_keep_ptr, log_floor_ptr, nll_ptr, logp_ptr, rank_ptr,
                         n, num_vtiles, ignore_index,
                         NUM_ALPHAS: tl.constexpr, ALPHA_BLOCK: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Merge the per-tile partials of ROWS rows and finish them (second pass, no atomics)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n
    y = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (y != ignore_index)
    x_t = tl.load(target_logit_ptr + rows, mask=row_mask, other=0.0)
    base = rows * num_vtiles
    m = tl.full((ROWS,), -float("inf"), tl.float32)
    s = tl.zeros((ROWS,), tl.float32)
    count = tl.zeros((ROWS,), tl.int32)
    bad = tl.zeros((ROWS,), tl.int32)
    end = tl.where(tl.max(valid.to(tl.int32), axis=0) > 0, num_vtiles, 0)
    offs = tl.arange(0, BLOCK)
    for start in range(0, end, BLOCK):
        t = start + offs
        mask = valid[:, None] & (t < num_vtiles)[None, :]
        idx = base[:, None] + t[None, :]
        pm = tl.load(pmax_ptr + idx, mask=mask, other=-float("inf"))
        ps = tl.load(psum_ptr + idx, mask=mask, other=0.0)
        count += tl.sum(tl.load(pcnt_ptr + idx, mask=mask, other=0), axis=1)
        # A tile holding +inf has max = +inf; a NaN logit makes the tile's sum NaN.
        bad += tl.sum(((ps != ps) | (pm == float("inf"))).to(tl.int32), axis=1)
        m_new = tl.maximum(m, tl.max(pm, axis=1))
        live = m_new != -float("inf")
        m_safe = tl.where(live, m_new, 0.0)
        scale = tl.where(m == -float("inf"), 0.0, tl.exp(m - m_safe))
        w = tl.where(pm == -float("inf"), 0.0, tl.exp(pm - m_safe[:, None]))
        s = s * scale + tl.sum(tl.where(pm == -float("inf"), 0.0, ps * w), axis=1)
        m = m_new
    bad_t = (x_t != x_t) | (x_t == float("inf"))
    _finish_rows(rows, row_mask, valid, (bad > 0) | bad_t, x_t, m, s, count, log_keep_ptr,
                 log_floor_ptr, nll_ptr, logp_ptr, rank_ptr, NUM_ALPHAS, ALPHA_BLOCK)


def linear_smoothed_nll_triton(
    hidden2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets1d: torch.Tensor,
    log_keep: torch.Tensor,
    log_floor: torch.Tensor,
    vocab_size: int,
    ignore_index: int,
    *,
    max_bytes: int | None = None,
    rows_per_program: int | None = None,
    block_n: int | None = None,
    block_v: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backend of ``tokenbounds.linear_smoothed_nll`` on validated input.

    Computes the outputs of :func:`smoothed_nll_triton` for logits ``hidden2d @ weight[:V].T (+ bias)``
    without materialising them: the workspace is 4 + 12 ceil(V / block_v) bytes per row (target
    logit + per-tile max, sum, count), and rows are processed in chunks so that it stays under
    ``max_bytes`` (default 512 MiB; at least one row tile).

    Args:
        hidden2d: [N, D] float32/bfloat16/float16.
        weight: [V_padded, D], same dtype.
        bias: optional [V_padded], same dtype.
        targets1d: [N] int64 (validated).
        log_keep, log_floor: [A] float64 log(1 - a) and log(a / V), on the device.
        vocab_size: the true V (weight rows >= V are ignored).

    Float32 inputs use IEEE float32 products unless ``torch.backends.cuda.matmul.allow_tf32``.
    """
    n, d = hidden2d.shape
    num_alphas = int(log_keep.numel())
    device = hidden2d.device
    nll_bits, logp, rank = _outputs(n, num_alphas, device)
    if n == 0:
        return nll_bits, logp, rank
    hidden2d = hidden2d.contiguous()
    weight = weight.contiguous()
    targets1d = targets1d.to(torch.int64).contiguous()
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else weight  # never read without HAS_BIAS
    on_gpu = hidden2d.is_cuda
    # Under the CPU interpreter large tiles are cheapest (numpy per operation).
    block_n = block_n or 64
    block_v = block_v or 128
    block_d = block_d or (64 if hidden2d.element_size() == 2 or not on_gpu else 32)
    block_d = max(16, min(block_d, triton.next_power_of_2(d)))
    num_vtiles = triton.cdiv(vocab_size, block_v)
    row_bytes = 4 + 12 * num_vtiles
    budget = max_bytes or 512 * 2**20
    chunk = min(n, max(block_n, budget // row_bytes // block_n * block_n))

    target_logit = torch.empty((chunk,), dtype=torch.float32, device=device)
    pmax = torch.empty((chunk, num_vtiles), dtype=torch.float32, device=device)
    psum = torch.empty((chunk, num_vtiles), dtype=torch.float32, device=device)
    pcnt = torch.empty((chunk, num_vtiles), dtype=torch.int32, device=device)
    if hidden2d.dtype == torch.float32 and not (on_gpu and torch.backends.cuda.matmul.allow_tf32):
        precision = "ieee"
    else:
        precision = "tf32"  # ignored for bf16/fp16 inputs (exact products, fp32 accumulation)
    block_t = 16 if on_gpu else 64
    merge_block = max(16, min(1024 if on_gpu else 4096, triton.next_power_of_2(num_vtiles)))
    rows = rows_per_program or (1 if on_gpu else 16)  # of the merge pass
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        h = hidden2d[start:start + m]
        t = targets1d[start:start + m]
        _target_logit_kernel[(triton.cdiv(m, block_t),)](
            h, weight, bias_arg, t, target_logit, m, d, ignore_index,
            HAS_BIAS=has_bias, BLOCK_T=block_t, BLOCK_D=max(16, min(128, triton.next_power_of_2(d))),
        )
        _linear_tile_kernel[(triton.cdiv(m, block_n) * num_vtiles,)](
            h, weight, bias_arg, t, target_logit, pmax, psum, pcnt,
            m, d, vocab_size, num_vtiles, ignore_index,
            HAS_BIAS=has_bias, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, GROUP_N=8,
            INPUT_PRECISION=precision, UPCAST=not on_gpu and hidden2d.dtype == torch.bfloat16,
            num_warps=8 if on_gpu else 1, num_stages=3 if on_gpu else 1,
        )
        _linear_merge_kernel[(triton.cdiv(m, rows),)](
            pmax, psum, pcnt, t, target_logit, log_keep, log_floor,
            nll_bits[start:start + m], logp[start:start + m], rank[start:start + m],
            m, num_vtiles, ignore_index,
            NUM_ALPHAS=num_alphas, ALPHA_BLOCK=max(2, triton.next_power_of_2(num_alphas)),
            ROWS=rows, BLOCK=merge_block,
        )
    return nll_bits, logp, rank
