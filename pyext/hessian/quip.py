"""The QuIP link: layer proxy-Hessian spectra -> predicted LDLQ proxy loss, next to the measured one.

QuIP (Chee, Cai, Kuleshov & De Sa, NeurIPS 2023) quantizes W [m, n] against the proxy loss
L(W_hat) = tr((W_hat - W) H (W_hat - W)^T), H = E[x x^T]. For a mu-incoherent H, LDLQ achieves
    L_LDLQ <= m sigma^2 mu^2 tr(H^(1/2))^2 / n        (QuIP, incoherent LDLQ bound)
against m sigma^2 tr(H) for independent rounding (nearest / stochastic), where sigma^2 is the
per-entry rounding variance. Since tr(H^(1/2))^2 / n <= tr(H) (Cauchy-Schwarz, equality iff
H ~ I), the ratio  gain = tr(H^(1/2))^2 / (n tr H)  in (0, 1] is how much LDLQ gains on a layer;
Finzi et al. (2024, "Compute-optimal LLMs provably generalize better with scale") tie the better
quantizability of larger models to this quantity.

Here sigma^2 = Delta^2 / 4 for a uniform b-bit grid of step Delta = 2 rho ||W||_F / sqrt(mn) /
(2^b - 1) over the incoherence-processed weights (rho = 2.4 as in QuIP), mu = 1 (ideal incoherence)
unless given. Predictions are reported relative to tr(W H W^T), the proxy loss of W = 0.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .estimators import slq_trace

MAX_DENSE_EIG = 8192


def sqrt_trace_stats(H: torch.Tensor, *, num_probes: int = 32, lanczos_steps: int = 40, seed: int = 0) -> dict:
    """tr(H), tr(H^(1/2)) (of the clamped spectrum: H is PSD up to rounding) and the LDLQ gain.

    Exact (eigvalsh) for n <= 8192, else stochastic Lanczos quadrature with its standard error.
    """
    n = H.shape[0]
    H64 = H.to(torch.float64)
    tr = float(torch.diagonal(H64).sum())
    if n <= MAX_DENSE_EIG:
        lam = torch.linalg.eigvalsh(H64)
        tr_sqrt, stderr = float(lam.clamp_min(0).sqrt().sum()), 0.0
    else:
        est = slq_trace(H64, "sqrt_clamped", num_probes=num_probes, lanczos_steps=lanczos_steps, seed=seed)
        tr_sqrt, stderr = est.value, est.stderr
    ratio = tr_sqrt**2 / tr if tr > 0 else math.nan
    return {"n": n, "tr_H": tr, "tr_sqrt_H": tr_sqrt, "tr_sqrt_H_stderr": stderr,
            "sqrt_trace_ratio": ratio, "ldlq_gain": ratio / n if tr > 0 else math.nan}


def predicted_proxy_loss(W: torch.Tensor, H: torch.Tensor, stats: dict, bits: int, *, rho: float = 2.4,
                         mu: float = 1.0) -> dict:
    """QuIP predictions of tr(dW H dW^T) / tr(W H W^T) for nearest rounding and incoherent LDLQ."""
    m, n = W.shape
    W64, H64 = W.detach().to(torch.float64), H.to(torch.float64)
    delta = 2 * rho * float(torch.linalg.matrix_norm(W64)) / math.sqrt(m * n) / (2**bits - 1)
    sigma2 = delta**2 / 4
    base = float(torch.einsum("ij,jk,ik->", W64, H64, W64))
    nearest = m * sigma2 * stats["tr_H"]
    ldlq = m * sigma2 * mu**2 * stats["tr_sqrt_H"] ** 2 / n
    rel = (lambda v: v / base) if base > 0 else (lambda v: math.nan)
    return {"bits": bits, "predicted_nearest": rel(nearest), "predicted_ldlq": rel(ldlq)}


def _measured(W: torch.Tensor, H: torch.Tensor, bits: int, seed: int):
    try:
        from ..quant import quantize_weight
    except ImportError:
        return None, "tokenbounds.quant.quantize_weight not available"
    kwargs = {"bits": bits, "method": "ldlq", "incoherence": True, "seed": seed}
    try:
        params = inspect.signature(quantize_weight).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in params}
        result = quantize_weight(W.detach().float(), H.float(), **kwargs)
        return float(result.proxy_loss), None
    except Exception as err:  # a failure of the other module must not hide our table
        return None, f"quantize_weight failed: {type(err).__name__}: {err}"


def quip_link_table(model: nn.Module, hessians: dict[str, torch.Tensor], *, bits: Sequence[int] = (2, 3, 4),
                    measure: bool = True, seed: int = 0, rho: float = 2.4, mu: float = 1.0) -> list[dict]:
    """One row per (layer, bits): spectrum statistics, QuIP predictions and the measured proxy loss.

    Args:
        model: the model whose ``nn.Linear`` weights are quantized.
        hessians: layer name -> proxy Hessian [n, n] (e.g. :func:`collect_proxy_hessians`).
        measure: call ``tokenbounds.quant.quantize_weight(..., method="ldlq", incoherence=True)``
            when importable; ``measured_proxy_loss`` is ``None`` otherwise (with a note).
    """
    modules = dict(model.named_modules())
    rows = []
    for name, H in hessians.items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name!r} is not an nn.Linear of the model")
        W = layer.weight
        stats = sqrt_trace_stats(H, seed=seed)
        for b in bits:
            row = {"layer": name, "out_features": W.shape[0], **stats}
            row.update(predicted_proxy_loss(W, H, stats, b, rho=rho, mu=mu))
            measured, note = _measured(W, H, b, seed) if measure else (None, "not requested")
            row["measured_proxy_loss"] = measured
            if note:
                row["note"] = note
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`quip_link_table` rows."""
    head = f"{'layer':32s} {'n':>5s} {'trH^.5^2/trH':>13s} {'gain':>7s} {'b':>2s} {'pred near':>10s} {'pred LDLQ':>10s} {'measured':>10s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        meas = "-" if r["measured_proxy_loss"] is None else f"{r['measured_proxy_loss']:.4g}"
        lines.append(
            f"{r['layer'][:32]:32s} {r['n']:5d} {r['sqrt_trace_ratio']:13.4g} {r['ldlq_gain']:7.4f} {r['bits']:2d} "
            f"{r['predicted_nearest']:10.4g} {r['predicted_ldlq']:10.4g} {meas:>10s}"
        )
    return "\n".join(lines)
