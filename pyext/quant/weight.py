"""quantize_weight: one matrix -> integer codes + side information with an exact coded size.

Pipeline (QuIP#, Tseng et al. 2024; QuIP, Chee et al. 2023):
1. pad W [out, in] to Hadamard sizes (and to a multiple of 8 for E8); zero rows/columns;
2. incoherence processing: W' = U W V^T, H' = V H V^T with U, V randomized Hadamard transforms
   whose signs come from ``seed`` (only the seed is stored);
3. scales: per row (or per group of ``group_size`` input columns), stored as float16;
4. rounding: LDLQ (= GPTQ) with error feedback, or round-to-nearest;
5. codes entropy-coded with :mod:`tokenbounds.bounds.coding` (range coder, empirical model).

The proxy loss tr(dW H dW^T) / tr(W H W^T) is invariant under the rotation, and is evaluated in
the original basis on the decoded weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import codebooks as cb
from .hadamard_matrices import is_supported_size
from .ldlq import cholesky_upper, damped_hessian, ldlq, rtn

CODEBOOKS = ("uniform", "e8")
METHODS = ("ldlq", "rtn")
UNIFORM_BITS = (2, 3, 4, 8)
E8_BITS = (2, 3, 4)
SCALE_BITS = 16  # float16 scales
HEADER_BITS = 2 * 32 + 8 + 32  # shape, codebook/bits/flags, group size
SEED_BITS = 64


def _padded_size(n: int, multiple: int, incoherence: bool) -> int:
    m = n
    while (m % multiple) or (incoherence and not is_supported_size(m)):
        m += 1
    return m


def _rotate(x: torch.Tensor, seed: int, stream: int, inverse: bool = False) -> torch.Tensor:
    from ..ops.hadamard import hadamard_transform

    return hadamard_transform(x.contiguous(), seed=seed, stream=stream, inverse=inverse)


def _rot_in(x, seed, inverse=False):  # acts on the last (input) dimension: rows w -> V w
    return _rotate(x, seed, 1, inverse)


def _rot_out(x, seed, inverse=False):  # acts on the output dimension (columns)
    return _rotate(x.t(), seed, 2, inverse).t()


def _message_bits(symbols: np.ndarray, num_levels: int | None = None):
    from ..bounds.coding import message_length_bits

    return message_length_bits(symbols, num_levels=num_levels, codebook_bits_per_entry=0)


@dataclass
class QuantizedWeight:
    """A quantized matrix: integer codes of the (rotated, padded) weight plus side information.

    ``dequantize()`` rebuilds the weight in the original basis from ``codes``, ``scales`` and
    ``seed`` alone. ``coded_bits`` = entropy-coded codes + float16 scales + header (+ seed).
    """

    shape: tuple[int, int]
    padded_shape: tuple[int, int]
    codebook: str
    bits: int
    method: str
    incoherence: bool
    seed: int
    group_size: int | None
    codes: torch.Tensor  # int64 [out', in'] (uniform: level index; e8: 2 x lattice coordinate)
    scales: torch.Tensor  # float16 [out', groups]
    dtype: torch.dtype = torch.float32
    proxy_loss: float = float("nan")
    coded_bits_detail: dict[str, float] = field(default_factory=dict)

    @property
    def num_weights(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def coded_bits(self) -> float:
        """Length in bits of the complete description (entropy-coded codes + side information)."""
        if not self.coded_bits_detail:
            self.coded_bits_detail = self._coded_bits_detail()
        return float(sum(self.coded_bits_detail.values()))

    @property
    def bits_per_weight(self) -> float:
        return self.coded_bits / self.num_weights

    def _scale_matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        s = self.scales.to(dtype)
        if self.group_size is None:
            return s[:, :1]
        return s.repeat_interleave(self.group_size, dim=1)[:, : self.padded_shape[1]]

    def symbol_streams(self) -> dict[str, tuple[np.ndarray, int | None]]:
        """The integer streams that are entropy-coded: name -> (symbols, num_levels or None)."""
        if self.codebook == "uniform":
            return {"codes": (self.codes.reshape(-1).numpy(), cb.uniform_levels(self.bits))}
        c, z7, w = cb.e8_to_streams(self.codes.reshape(-1, 8).to(torch.float64) / 2)
        return {"coset": (c, 2), "coords": (z7, None), "last": (w, None)}

    def _coded_bits_detail(self) -> dict[str, float]:
        detail: dict[str, float] = {}
        for name, (sym, levels) in self.symbol_streams().items():
            detail[f"{name}_bits"] = float(_message_bits(sym, levels).total_bits)
        detail["scale_bits"] = float(SCALE_BITS * self.scales.numel())
        detail["header_bits"] = float(HEADER_BITS + (SEED_BITS if self.incoherence else 0))
        return detail

    def rotated_values(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Decoded weight in the rotated, padded basis. Exact in float32 too: a value is a
        (half-)integer code of at most 8 bits times a float16 scale (11 significant bits)."""
        if self.codebook == "uniform":
            return cb.uniform_dequantize(self.codes, self._scale_matrix(dtype), self.bits)
        return self.codes.to(dtype) / 2 * self._scale_matrix(dtype)

    def dequantize(self) -> torch.Tensor:
        """The decoded weight [out, in] in the original basis and dtype."""
        w = self.rotated_values(torch.float64 if self.dtype == torch.float64 else torch.float32)
        if self.incoherence:
            w = _rot_out(_rot_in(w, self.seed, inverse=True), self.seed, inverse=True)
        return w[: self.shape[0], : self.shape[1]].to(self.dtype).contiguous()

    def encode(self) -> dict[str, Any]:
        """Everything a decoder needs: range-coded streams, float16 scales, the header fields."""
        from ..bounds.coding import encode_symbols

        streams = {name: encode_symbols(sym, num_levels=levels) for name, (sym, levels) in self.symbol_streams().items()}
        return {
            "shape": self.shape, "padded_shape": self.padded_shape, "codebook": self.codebook,
            "bits": self.bits, "method": self.method, "incoherence": self.incoherence,
            "seed": self.seed, "group_size": self.group_size, "dtype": str(self.dtype).removeprefix("torch."),
            "scales": self.scales.numpy().copy(), "streams": streams,
        }

    @classmethod
    def decode(cls, payload: dict[str, Any]) -> QuantizedWeight:
        """Inverse of :meth:`encode` (no proxy loss: that needs the original weight)."""
        from ..bounds.coding import decode_symbols

        syms = {name: decode_symbols(enc) for name, enc in payload["streams"].items()}
        out_p, in_p = payload["padded_shape"]
        if payload["codebook"] == "uniform":
            codes = torch.from_numpy(syms["codes"]).reshape(out_p, in_p)
        else:
            pts = cb.e8_from_streams(syms["coset"], syms["coords"], syms["last"])
            codes = torch.round(pts * 2).to(torch.int64).reshape(out_p, in_p)
        return cls(
            shape=tuple(payload["shape"]), padded_shape=(out_p, in_p), codebook=payload["codebook"],
            bits=payload["bits"], method=payload["method"], incoherence=payload["incoherence"],
            seed=payload["seed"], group_size=payload["group_size"], codes=codes,
            scales=torch.from_numpy(payload["scales"]), dtype=getattr(torch, payload["dtype"]),
        )


def proxy_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None) -> float:
    """tr(dW H dW^T) / tr(W H W^T) with dW = w_hat - w (H = None: the identity).

    Computed as <H, dW^T dW> / <H, W^T W>: each Gram matrix is one triangle of X^T X
    (:func:`tokenbounds.ops.gram.gram_accumulate_`, float32) and the inner products with H are
    summed in float64. Costs two one-triangle products instead of
    the two float64 n^3 products of ``einsum("ij,jk,ik->", dW, H, dW)``.
    """
    from ..ops.gram import gram_accumulate_

    n = w.shape[1]
    work = torch.float64 if torch.float64 in (w.dtype, w_hat.dtype) else torch.float32
    w = w.detach().to("cpu", work)
    d = w_hat.detach().to("cpu", work) - w
    if h is None:
        den = float(w.square().sum(dtype=torch.float64))
        num = float(d.square().sum(dtype=torch.float64))
        return num / den if den > 0 else (0.0 if num == 0 else math.inf)
    hh = h.detach().to("cpu")
    hdiag = torch.diagonal(hh).to(torch.float64)

    def inner(x32: torch.Tensor) -> float:  # <H, X^T X> from the upper triangle of X^T X
        g = gram_accumulate_(torch.zeros((n, n), dtype=torch.float32), x32.contiguous())
        off = torch.mul(hh, g).sum(1).to(torch.float64).sum()  # row sums in H's precision, their sum in float64
        return float(2.0 * off - torch.dot(hdiag, torch.diagonal(g).to(torch.float64)))

    den = inner(w.to(torch.float32))
    num = max(0.0, inner(d.to(torch.float32))) if bool(d.any()) else 0.0
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _uniform_scales(w: torch.Tensor, bits: int, group_size: int | None, candidates: int = 35) -> torch.Tensor:
    """Per-row (or per-group) float16 scales minimizing the round-to-nearest squared error.

    Searches ``candidates`` float16 scales s = maxabs * t / ((L - 1) / 2), t in [0.15, 1], for
    every row (group of ``group_size`` columns, zero-padded). The error of every candidate comes
    from one sort of the row: with prefix sums P1, P2 of the sorted values, the entries rounded to
    level v_j = (j - (L - 1)/2) s are those between the decision boundaries, and they contribute
    (P2[hi] - P2[lo]) - 2 v_j (P1[hi] - P1[lo]) + (hi - lo) v_j^2; so a candidate costs O(L log n)
    instead of a pass over the row.
    """
    out, n = w.shape
    g = n if group_size is None else group_size
    groups = -(-n // g)
    x = w.to(torch.float32)
    if groups * g != n:
        x = torch.nn.functional.pad(x, (0, groups * g - n))
    x = x.reshape(out * groups, g)
    levels = cb.uniform_levels(bits)
    half = (levels - 1) / 2
    xs = torch.sort(x, dim=-1).values
    maxabs = torch.maximum(xs[:, -1].abs(), xs[:, 0].abs()).to(torch.float64).clamp_min(1e-12)
    ts = torch.linspace(0.15, 1.0, candidates, dtype=torch.float64)
    cand = (maxabs[:, None] * ts / half).to(torch.float16).to(torch.float64).clamp_min(6e-8)  # [R, K]
    level_values = torch.arange(levels, dtype=torch.float64) - half  # v_j / s
    cuts = level_values[:-1] + 0.5  # decision boundaries / s
    best = torch.empty(out * groups, dtype=torch.float64)
    rows = max(1, (1 << 21) // (candidates * levels))
    for r0 in range(0, out * groups, rows):
        xr = xs[r0:r0 + rows]
        r = xr.shape[0]
        x64 = xr.to(torch.float64)
        p1 = x64.new_zeros((r, g + 1))
        torch.cumsum(x64, -1, out=p1[:, 1:])
        total_sq = x64.square_().sum(-1, keepdim=True)  # x64 is no longer needed
        c = cand[r0:r0 + rows]
        bounds = (c[:, :, None] * cuts).to(torch.float32)  # [r, K, L-1], compared in the values' precision
        idx = torch.searchsorted(xr, bounds.reshape(r, -1)).reshape(r, candidates, levels - 1)
        pos = torch.cat([idx.new_zeros(r, candidates, 1), idx, idx.new_full((r, candidates, 1), g)], -1)
        flat = pos.reshape(r, -1)
        s1 = p1.gather(1, flat).reshape(pos.shape).diff(dim=-1)  # [r, K, L]: sum of the entries of each level
        cnt = pos.diff(dim=-1).to(torch.float64)
        v = c[:, :, None] * level_values  # [r, K, L]
        err = total_sq - (2 * v * s1 - cnt * v * v).sum(-1)  # [r, K]
        best[r0:r0 + rows] = c.gather(1, err.argmin(-1, keepdim=True))[:, 0]
    return best.reshape(out, groups).to(torch.float16)


def _e8_entropy_bits_per_weight(w: torch.Tensor, scale: torch.Tensor) -> float:
    pts = cb.e8_nearest((w / scale).reshape(-1, 8))
    total = 0.0
    for sym in cb.e8_to_streams(pts):
        _, counts = np.unique(sym, return_counts=True)
        p = counts / counts.sum()
        total += float(-(counts * np.log2(p)).sum())
    return total / w.numel()


def _e8_scales(w: torch.Tensor, bits: float, seed: int, tol_bits: float = 1e-3) -> torch.Tensor:
    """Per-row float16 scales rms_r * c, with one c set so RTN codes of a row sample have ~``bits`` entropy.

    The entropy falls by about 1/ln 2 bits per weight per unit of ln c, so c is found by a
    bracketing secant (Illinois) on ln c from that slope: ~5-7 entropy evaluations (the
    bisection it replaces needed 22), stopping within ``tol_bits`` of the target.
    """
    rms = w.pow(2).mean(1).sqrt().clamp_min(1e-12)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(w.shape[0], generator=gen)[: max(1, min(w.shape[0], 65536 // max(1, w.shape[1]) + 8))]
    sample, srms = w[rows], rms[rows, None]

    def excess(x: float) -> float:  # entropy - target, decreasing in x = ln c
        return _e8_entropy_bits_per_weight(sample, srms * math.exp(x)) - bits

    lo_lim, hi_lim = math.log(1e-3), math.log(10.0)
    x0 = 0.0
    f0 = excess(x0)
    step = max(0.05, abs(f0) * math.log(2.0))
    x1 = min(hi_lim, max(lo_lim, x0 + math.copysign(step, f0)))
    f1 = excess(x1)
    while f0 * f1 > 0 and lo_lim < x1 < hi_lim:  # not yet bracketed: keep stepping
        x0, f0 = x1, f1
        step *= 2
        x1 = min(hi_lim, max(lo_lim, x1 + math.copysign(step, f1)))
        f1 = excess(x1)
    if f0 * f1 > 0:  # the target is outside [1e-3, 10] x rms: take the nearer end
        c = math.exp(x1)
    else:
        (lo, flo), (hi, fhi) = sorted([(x0, f0), (x1, f1)])
        x, fx = (lo, flo) if abs(flo) < abs(fhi) else (hi, fhi)
        side = 0
        for _ in range(40):
            if abs(fx) <= tol_bits or hi - lo < 1e-6:
                break
            x = (lo * fhi - hi * flo) / (fhi - flo) if fhi != flo else 0.5 * (lo + hi)
            if not lo < x < hi:
                x = 0.5 * (lo + hi)
            fx = excess(x)
            if fx > 0:  # entropy too high: c must grow
                lo, flo = x, fx
                if side == -1:
                    fhi *= 0.5
                side = -1
            else:
                hi, fhi = x, fx
                if side == 1:
                    flo *= 0.5
                side = 1
        c = math.exp(x)
    return (rms * c).to(torch.float16).clamp_min(6e-8)[:, None]


def _check_args(weight, hessian, bits, codebook, method, group_size, seed, damp):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out, in], got {getattr(weight, 'shape', type(weight).__name__)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if 0 in weight.shape:
        raise ValueError(f"weight has an empty dimension: shape {tuple(weight.shape)}")
    n = weight.shape[1]
    if hessian is not None:
        if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (n, n):
            raise ValueError(
                f"hessian must be a tensor [in, in] = [{n}, {n}] (E[x x^T] of the layer input), "
                f"got {getattr(hessian, 'shape', type(hessian).__name__)}"
            )
        if not bool(torch.isfinite(hessian).all()):
            raise ValueError("hessian contains NaN or inf")
    check_quantizer_args(bits, codebook, method, group_size, seed, damp)


def check_quantizer_args(bits, codebook: str, method: str, group_size=None, seed: int = 0, damp: float = 0.01) -> None:
    """Raise ValueError for settings :func:`quantize_weight` does not accept (one message per mistake)."""
    if codebook not in CODEBOOKS:
        raise ValueError(f"codebook must be one of {CODEBOOKS}, got {codebook!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    allowed = UNIFORM_BITS if codebook == "uniform" else E8_BITS
    if isinstance(bits, bool) or bits not in allowed:
        raise ValueError(f"bits must be one of {allowed} for codebook={codebook!r}, got {bits!r}")
    if group_size is not None:
        if codebook == "e8":
            raise ValueError("group_size applies to the uniform codebook; the e8 codebook uses per-row scales")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int or None (per-row scales), got {group_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not (isinstance(damp, (int, float)) and 0 <= damp < 1):
        raise ValueError(f"damp must be a float in [0, 1) (fraction of the mean Hessian diagonal), got {damp!r}")


def quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor | None = None,
    *,
    bits: int = 2,
    codebook: str = "uniform",
    method: str = "ldlq",
    incoherence: bool = True,
    seed: int = 0,
    group_size: int | None = None,
    damp: float = 0.01,
    block_size: int = 128,
) -> QuantizedWeight:
    """Quantize one matrix W [out, in] given the proxy Hessian H = E[x x^T] [in, in].

    Args:
        weight: the layer weight (nn.Linear convention: y = W x).
        hessian: E[x x^T] of the layer input (default identity: plain weight MSE).
        bits: uniform: 2, 3, 4 or 8 (2^bits levels); e8: target entropy in bits per weight
            (the E8 lattice scale is chosen so round-to-nearest codes have that entropy).
        codebook: "uniform" (symmetric grid, scale per row or per ``group_size`` columns) or
            "e8" (E8 lattice over groups of 8 input columns, per-row scale).
        method: "ldlq" (error feedback, = GPTQ) or "rtn" (round to nearest).
        incoherence: randomized Hadamard transforms on both sides (QuIP#); False to measure what
            they buy.
        seed: seeds the Hadamard signs (stored in the code: 64 bits).
        damp: LDLQ damping, as a fraction of the mean diagonal of H.
    """
    _check_args(weight, hessian, bits, codebook, method, group_size, seed, damp)
    out, n = weight.shape
    # W' and H' are formed in float32 (float64 for float64 weights): LDLQ works in float32
    # anyway (as GPTQ does); the quantizers see float64 columns.
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w_in = weight.detach().to("cpu")
    group = 8 if codebook == "e8" else 1
    out_p = _padded_size(out, 1, incoherence)
    in_p = _padded_size(n, group, incoherence)
    wp = torch.zeros((out_p, in_p), dtype=work)
    wp[:out, :n] = w_in
    if incoherence:
        wp = _rot_out(_rot_in(wp, seed), seed).contiguous()
    h_sym = None
    if hessian is not None:
        h_sym = hessian.detach().to("cpu", work)
        h_sym = h_sym.add(h_sym.t()).mul_(0.5)
    hp = None
    if method == "ldlq":
        if h_sym is None and in_p == n:
            hp = torch.eye(n, dtype=work)  # V I V^T = I
        else:
            hp = torch.zeros((in_p, in_p), dtype=work)
            hp[:n, :n] = torch.eye(n, dtype=work) if h_sym is None else h_sym
            if incoherence:
                # V H V^T; only its lower triangle is read by the Cholesky, so it is not re-symmetrized
                hp = _rot_in(_rot_in(hp, seed).t(), seed)

    if codebook == "uniform":
        scales = _uniform_scales(wp, bits, group_size)
        s64 = scales.to(torch.float64)

        def quantizer(cols: torch.Tensor, first: int):
            if group_size is None:
                s = s64[:, :1]
            else:
                idx = torch.arange(first, first + cols.shape[1]) // group_size
                s = s64[:, idx]
            return cb.uniform_quantize(cols, s, bits)
    else:
        scales = _e8_scales(wp, float(bits), seed)
        s64 = scales.to(torch.float64)

        def quantizer(cols: torch.Tensor, first: int):
            pts = cb.e8_nearest((cols / s64).reshape(-1, 8)).reshape(cols.shape)
            return pts * s64, torch.round(pts * 2).to(torch.int64)

    if method == "rtn":
        _, codes = rtn(wp, quantizer, group=group)
    else:
        hd, dead = damped_hessian(hp, damp)
        del hp
        wl = wp
        if bool(dead.any()):
            wl = wp.clone()
            wl[:, dead] = 0.0
        m = cholesky_upper(hd, damp, dtype=torch.float32)
        del hd
        _, codes = ldlq(wl, m, quantizer, group=group, block_size=block_size)
    qw = QuantizedWeight(
        shape=(out, n), padded_shape=(out_p, in_p), codebook=codebook, bits=int(bits), method=method,
        incoherence=bool(incoherence), seed=int(seed), group_size=group_size, codes=codes,
        scales=scales, dtype=weight.dtype,
    )
    qw.proxy_loss = proxy_loss(w_in, qw.dequantize(), h_sym)
    return qw
