"""Triton kernel for tokenbounds::hadamard_transform (mirrors csrc/include/tokenbounds/hadamard.h).

One program per row. The row is held as a [K_PAD, M_PAD] tile (element a * m + b at (a, b));
the log2(m) butterfly stages run along axis 1 by reshaping to [K_PAD, M_PAD / 2h, 2, h] and
splitting the pair axis; chunks of width m never mix because m divides M_PAD. The K x K mix
across chunks re-reads the butterflied chunks one at a time from the output row (written before a
barrier) and accumulates +-1 multiples in float32 (float64 for float64 inputs), so no tensor-core
rounding enters. Runs under TRITON_INTERPRET=1 on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _hadamard_kernel(x_ptr, out_ptr, hk_ptr, scale, n, K: tl.constexpr, M: tl.constexpr,
                     K_PAD: tl.constexpr, M_PAD: tl.constexpr, LOG_M: tl.constexpr,
                     ACC_F64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a = tl.arange(0, K_PAD)[:, None]
    b = tl.arange(0, M_PAD)[None, :]
    mask = (a < K) & (b < M)
    offs = row * n + a * M + b
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if ACC_F64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    for s in tl.static_range(LOG_M):
        # 1 << s inline: a `h: tl.constexpr` re-bound each unrolled iteration is rejected by the
        # Triton 3.6 compiler ("constexpr cannot be reassigned"; the interpreter accepts it)
        y = tl.reshape(x, (K_PAD, M_PAD // (2 << s), 2, 1 << s))
        y = tl.permute(y, (0, 1, 3, 2))
        lo, hi = tl.split(y)
        y = tl.join(lo + hi, lo - hi)
        y = tl.permute(y, (0, 1, 3, 2))
        x = tl.reshape(y, (K_PAD, M_PAD))
    if K == 1:
        tl.store(out_ptr + offs, (x * scale).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Stage the butterflied chunks in the output row, then mix them across chunks.
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()
        acc = tl.zeros((K_PAD, M_PAD), dtype=x.dtype)
        bm = tl.arange(0, M_PAD)
        ka = tl.arange(0, K_PAD)
        for ap in range(K):
            z = tl.load(out_ptr + row * n + ap * M + bm, mask=bm < M, other=0.0).to(x.dtype)
            hcol = tl.load(hk_ptr + ka * K + ap, mask=ka < K, other=0.0).to(x.dtype)
            acc += hcol[:, None] * z[None, :]
        tl.debug_barrier()
        tl.store(out_ptr + offs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


def hadamard_transform_triton(x: torch.Tensor, hk: torch.Tensor, scale: float) -> torch.Tensor:
    """y = scale * x @ (H_K (x) H_m)^T for contiguous 2-D x [rows, n]; hk [K, K] float32."""
    rows, n = x.shape
    k = hk.shape[0]
    m = n // k
    out = torch.empty_like(x)
    if rows == 0:
        return out
    # Butterflies on float16/bfloat16 rows are staged through the output in the input dtype when
    # K > 1; stage in float32 instead so the mix sees unrounded values.
    stage = out if (k == 1 or x.dtype in (torch.float32, torch.float64)) else torch.empty(
        (rows, n), dtype=torch.float32, device=x.device)
    _hadamard_kernel[(rows,)](
        x, stage, hk, float(scale), n,
        K=k, M=m, K_PAD=triton.next_power_of_2(k), M_PAD=m, LOG_M=m.bit_length() - 1,
        ACC_F64=x.dtype == torch.float64,
    )
    if stage is not out:
        out.copy_(stage)
    return out
