"""The float64 oracle check of linear_smoothed_nll, shared by the CPU and CUDA test files.

The kernels compute the logits hidden @ weight.T (+ bias) in float32 (any summation order), so
the check allows, per row, the float32 GEMM's error bound E = 2 D u max_j sum_k |h_k w_jk| +
u |bias| (u = 2^-24) on every logit: log p may move by 2E (plus the exp approximation's 1e-6
relative), and the rank may count any logit within 2E of the target's as above or below it.
"""

from __future__ import annotations

import math

import torch
from tokenbounds.reference import linear_smoothed_nll_reference

UNIT = 2.0**-24


def logit_error_bound(hidden, weight, bias, vocab) -> torch.Tensor:
    """Per row, a bound on |float32 logit - exact logit| for every vocabulary entry."""
    h = hidden.double().abs()
    w = weight[:vocab].double().abs()
    mag = (h @ w.T) if h.shape[1] else torch.zeros(h.shape[0], vocab, dtype=torch.float64, device=h.device)
    if bias is not None:
        mag = mag + bias[:vocab].double().abs().nan_to_num(posinf=0.0, neginf=0.0)  # -inf: exact
    d = max(hidden.shape[1], 1)
    return (2 * (d + 2) * UNIT) * mag.max(dim=1).values if mag.shape[0] else mag.new_zeros(0)


def assert_linear_matches_oracle(losses, hidden, weight, bias, targets, alphas, vocab, ignore_index=-100):
    """``losses`` (a TokenLosses or the op's (nll_bits, logp, rank)) against the float64 oracle."""
    if isinstance(losses, tuple):
        nll, logp, rank = losses
    else:
        nll, logp, rank = losses.nll_bits, losses.logp, losses.rank
    nll, logp, rank = nll.cpu(), logp.cpu(), rank.cpu()
    hidden, weight = hidden.cpu(), weight.cpu()
    bias = bias.cpu() if bias is not None else None
    targets = targets.cpu()
    a = torch.tensor(alphas, dtype=torch.float64)
    ref_nll, ref_logp, ref_rank = linear_smoothed_nll_reference(hidden, weight, bias, targets, a, vocab, ignore_index)
    assert nll.shape == ref_nll.shape and nll.dtype == torch.float32
    assert logp.dtype == torch.float32 and rank.dtype == torch.int32
    if targets.numel() == 0:
        return
    err = logit_error_bound(hidden, weight, bias, vocab)
    tol = (2 * err + 1e-6 * ref_logp.double().abs().clamp(min=1.0) + 1e-6).float()
    assert torch.equal(torch.isneginf(logp), torch.isneginf(ref_logp)), "p_y = 0 rows must match"
    finite = torch.isfinite(ref_logp)
    assert ((logp - ref_logp).abs() <= tol)[finite].all(), float(((logp - ref_logp).abs() - tol)[finite].max())
    # d nll / d logp <= 1 / ln 2 bits per nat, at every smoothing level.
    inf_ref = torch.isinf(ref_nll)
    assert torch.equal(torch.isinf(nll), inf_ref)
    tol_bits = tol[:, None] / math.log(2) + 1e-6 * ref_nll.abs().clamp(min=1.0)
    assert ((nll - ref_nll).abs() <= tol_bits)[~inf_ref].all()
    # Rank: exact except for logits within 2E of the target logit.
    logits = hidden.double() @ weight[:vocab].double().T
    if bias is not None:
        logits = logits + bias[:vocab].double()
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    xt = logits.gather(1, safe[:, None])
    near = ((logits - xt).abs() <= 2 * err[:, None]).sum(1) - 1  # the target itself is "near"
    diff = (rank.long() - ref_rank.long()).abs()
    assert (diff <= near.clamp(min=0))[valid].all(), "rank differs beyond the rounding of near ties"
    assert (rank[~valid] == 0).all() and (logp[~valid] == 0).all() and (nll[~valid] == 0).all()
