"""Codebooks: uniform scalar grids and the E8 lattice (nearest point + integer codes).

E8 = D8 U (D8 + 1/2) with D8 = {z in Z^8 : sum z even}: the densest lattice packing in 8
dimensions (granular gain 0.65 dB over the scalar grid). Nearest point by the decoder of Conway &
Sloane (1982, "Fast quantizing and decoding algorithms for lattice quantizers and codes"): round to
D8 (round every coordinate; if the sum is odd, re-round the coordinate with the largest rounding
error the other way), do the same for x - 1/2 and add 1/2 back, keep the closer of the two.
QuIP# (Tseng et al. 2024) uses a 2^16-entry E8 ball ("E8P") searched exhaustively; here the whole
scaled lattice is used and the codes are entropy-coded, so the rate is set by the scale.

What ``bits`` means for the E8 codebook (``quantize_weight(..., codebook="e8", bits=b)``):
it is an *entropy target*, not a fixed-length code. QuIP#'s E8P spends exactly 16 bits per 8
weights (2 bits/weight) on an index into a fixed 2^16-point codebook. Here each row r gets the
scale s_r = c * rms(W_r) (float16), with one global c found by bisection so that the empirical
entropy of the round-to-nearest E8 points of W / s (the three streams of :func:`e8_to_streams`,
sampled rows) is b bits per weight. The *coded* size is then whatever the range coder spends on
the actual codes, which differs from b because (1) LDLQ's error feedback changes the code
statistics (RTN codes at that scale have entropy b, LDLQ codes do not), (2) the coder's level
counts, headers and the float16 scales are added, and (3) the bisection used a row sample.
So compare E8 with other codebooks through ``QuantizedWeight.bits_per_weight`` (the honest coded
rate), never through ``bits``; ``benchmarks/bench_quant.py`` tunes the E8 scale so that coded
rates match within 2%. For the uniform grid, ``bits`` is exact: 2^bits levels, and the coded
rate is at most about ``bits`` per weight (entropy coding only removes redundancy).
"""

from __future__ import annotations

import numpy as np
import torch


def _d8_nearest(x: torch.Tensor) -> torch.Tensor:
    f = torch.round(x)
    odd = torch.remainder(f.sum(-1), 2) != 0
    if bool(odd.any()):
        d = x - f
        idx = d.abs().argmax(-1, keepdim=True)
        step = torch.where(d.gather(-1, idx) >= 0, 1.0, -1.0).to(x.dtype)
        f = f.scatter_add(-1, idx, torch.where(odd[..., None], step, torch.zeros_like(step)))
    return f


def e8_nearest(x: torch.Tensor) -> torch.Tensor:
    """Nearest E8 lattice point to each row of x [..., 8] (Conway & Sloane decoder); float dtype of x."""
    if x.shape[-1] != 8:
        raise ValueError(f"e8_nearest needs a last dimension of 8, got shape {tuple(x.shape)}")
    a = _d8_nearest(x)
    b = _d8_nearest(x - 0.5) + 0.5
    da = ((x - a) ** 2).sum(-1, keepdim=True)
    db = ((x - b) ** 2).sum(-1, keepdim=True)
    return torch.where(db < da, b, a)


def zigzag(v: np.ndarray) -> np.ndarray:
    """Signed ints -> non-negative ints: 0, -1, 1, -2, 2, ... -> 0, 1, 2, 3, 4, ..."""
    v = np.asarray(v, dtype=np.int64)
    return np.where(v >= 0, 2 * v, -2 * v - 1)


def unzigzag(u: np.ndarray) -> np.ndarray:
    u = np.asarray(u, dtype=np.int64)
    return np.where(u % 2 == 0, u // 2, -(u + 1) // 2)


def e8_to_streams(points: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split E8 points [N, 8] into three integer streams that determine them exactly.

    With c in {0, 1} the coset (p in D8 + c/2) and z = p - c/2 in Z^8, sum(z) is even, so z_7's
    parity follows from z_0..z_6: the streams are (coset bits [N], zigzag(z_0..z_6) [7N],
    zigzag((z_7 - parity) / 2) [N]). Saves the 1 redundant bit per 8 weights a naive code spends.
    """
    y = torch.round(points.to(torch.float64) * 2).to(torch.int64).cpu().numpy().reshape(-1, 8)
    c = y[:, 0] & 1
    z = (y - c[:, None]) // 2
    par = z[:, :7].sum(1) & 1
    w = (z[:, 7] - par) // 2
    return c.astype(np.int64), zigzag(z[:, :7].reshape(-1)), zigzag(w)


def e8_from_streams(coset: np.ndarray, z7: np.ndarray, w: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`e8_to_streams`: E8 points [N, 8] float64."""
    z = unzigzag(z7).reshape(-1, 7)
    last = 2 * unzigzag(w) + (z.sum(1) & 1)
    full = np.concatenate([z, last[:, None]], axis=1).astype(np.float64) + 0.5 * np.asarray(coset)[:, None]
    return torch.from_numpy(full)


def uniform_levels(bits: int) -> int:
    return 2 ** int(bits)


def uniform_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest point of the symmetric grid s * (j - (L - 1)/2), j = 0..L-1 (L = 2^bits).

    Returns (values, codes j as int64). ``scale`` broadcasts against x.
    """
    L = uniform_levels(bits)
    half = (L - 1) / 2
    j = torch.div(x, scale).add_(half).round_().clamp_(0, L - 1)  # in place: half the memory traffic
    codes = j.to(torch.int64)
    return j.sub_(half).mul_(scale), codes


def uniform_dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    half = (uniform_levels(bits) - 1) / 2
    return (codes.to(scale.dtype) - half) * scale
