"""Triton kernels of the gram family (mirror csrc/include/tokenbounds/gram.h bit for bit).

* ``gram_accumulate_triton(acc, x)``: acc += triu(x^T x); one program per upper-triangle tile
  (the tile list is built on the host, so no program is launched below the diagonal).
* ``rademacher_matmul_triton(x, key, offset, k)``: x @ Z with the Rademacher tile of Z
  regenerated in registers from the counter-based hash; Z is never stored.

Both run under TRITON_INTERPRET=1 on CPU tensors (no libdevice, no ``.to()`` on scalar args: the
probe keys travel in a tiny int64 tensor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gram_tile_kernel(
    x_ptr, acc_ptr, tiles_ptr, n, d, stride_x, stride_acc,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr, ACC_F64: tl.constexpr,
):
    pid = tl.program_id(0)
    i0 = tl.load(tiles_ptr + 2 * pid)
    j0 = tl.load(tiles_ptr + 2 * pid + 1)
    ri = i0 + tl.arange(0, BLOCK_I)
    rj = j0 + tl.arange(0, BLOCK_J)
    if ACC_F64:
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for r0 in range(0, n, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rmask = rr[:, None] < n
        a = tl.load(x_ptr + rr[:, None] * stride_x + ri[None, :], mask=rmask & (ri[None, :] < d), other=0.0)
        b = tl.load(x_ptr + rr[:, None] * stride_x + rj[None, :], mask=rmask & (rj[None, :] < d), other=0.0)
        if ACC_F64:
            a64 = a.to(tl.float64)
            b64 = b.to(tl.float64)
            acc += tl.sum(a64[:, :, None] * b64[:, None, :], axis=0)
        else:
            acc += tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), input_precision="ieee")
    mask = (ri[:, None] < d) & (rj[None, :] < d) & (rj[None, :] >= ri[:, None])
    ptrs = acc_ptr + ri[:, None] * stride_acc + rj[None, :]
    old = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, old + acc, mask=mask)


@triton.jit
def _rademacher_matmul_kernel(
    x_ptr, y_ptr, key_ptr, n, d, k, offset, stride_x,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC_F64: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_key = tl.load(key_ptr).to(tl.uint32)
    col_key = tl.load(key_ptr + 1).to(tl.uint32)
    cols = (rc + offset).to(tl.uint32)
    if ACC_F64:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for i0 in range(0, d, BLOCK_D):
        ri = i0 + tl.arange(0, BLOCK_D)
        xt = tl.load(x_ptr + rn[:, None] * stride_x + ri[None, :], mask=(rn[:, None] < n) & (ri[None, :] < d), other=0.0)
        rs = _mix32(ri.to(tl.uint32) ^ row_key)
        h = _mix32(rs[:, None] ^ cols[None, :] ^ col_key)
        h = _mix32(h + 0x632BE5AB)
        if ACC_F64:
            z = tl.where((h >> 31) != 0, -1.0, 1.0).to(tl.float64)
            acc += tl.sum(xt.to(tl.float64)[:, :, None] * z[None, :, :], axis=1)
        else:
            z = tl.where((h >> 31) != 0, -1.0, 1.0).to(tl.float32)
            acc += tl.dot(xt.to(tl.float32), z, input_precision="ieee")
    tl.store(y_ptr + rn[:, None] * k + rc[None, :], acc, mask=(rn[:, None] < n) & (rc[None, :] < k))


def _upper_tiles(d: int, block_i: int, block_j: int, device) -> torch.Tensor:
    pairs = [(i0, j0) for i0 in range(0, d, block_i) for j0 in range(0, d, block_j) if j0 + block_j > i0]
    return torch.tensor(pairs, dtype=torch.int64, device=device).reshape(-1)


def gram_accumulate_triton(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc[i, j] += sum_r x[r, i] x[r, j] for j >= i (validated by tokenbounds.ops.gram)."""
    n, d = x.shape
    f64 = acc.dtype == torch.float64
    block = 16 if f64 else 32
    block_r = 8 if f64 else 32
    tiles = _upper_tiles(d, block, block, x.device)
    _gram_tile_kernel[(tiles.numel() // 2,)](
        x, acc, tiles, n, d, x.stride(0), acc.stride(0),
        BLOCK_I=block, BLOCK_J=block, BLOCK_R=block_r, ACC_F64=f64,
    )


def rademacher_matmul_triton(x: torch.Tensor, key: tuple[int, int], offset: int, k: int) -> torch.Tensor:
    """x @ Z, Z[i, c] = rademacher(key, i, offset + c), float64 for float64 x else float32."""
    n, d = x.shape
    f64 = x.dtype == torch.float64
    y = torch.zeros((n, k), dtype=torch.float64 if f64 else torch.float32, device=x.device)
    if n == 0 or k == 0 or d == 0:
        return y
    keys = torch.tensor(list(key), dtype=torch.int64, device=x.device)
    block_n, block_k, block_d = (16, 16, 16) if f64 else (32, 16, 32)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _rademacher_matmul_kernel[grid](
        x, y, keys, n, d, k, offset, x.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, ACC_F64=f64,
    )
    return y
