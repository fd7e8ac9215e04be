"""Slow float64 pure-torch oracles, one per kernel. Every backend is tested against these.

Other kernel families add their oracles here (hadamard, quantizers, gram / probe products).
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def smoothed_nll_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alphas: torch.Tensor,
    vocab_size: int,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Oracle for tokenbounds::smoothed_nll on 2-D logits [N, V_padded] and targets [N].

    Returns (nll_bits [N, A] float32, logp [N] float32, rank [N] int32), computed in float64:
    log p_y = x_y - logsumexp(x[:V]); nll_a = -log2((1 - a) p_y + a / V) evaluated as
    -logaddexp(log(1 - a) + log p_y, log(a / V)) / ln 2 (Lotfi et al. 2024, prediction smoothing);
    rank = #{j < V : x_j > x_y}.
    """
    x = logits[:, :vocab_size].to(torch.float64)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    target_logit = x.gather(1, safe_targets[:, None])[:, 0] if x.shape[0] else x.new_zeros(0)
    logp = target_logit - torch.logsumexp(x, dim=-1) if x.shape[0] else x.new_zeros(0)
    logp = torch.where(torch.isneginf(target_logit), torch.full_like(logp, -math.inf), logp)
    rank = (x > target_logit[:, None]).sum(-1)
    a = alphas.to(torch.float64)
    log_keep = torch.log1p(-a)
    log_floor = torch.where(a > 0, torch.log(a) - math.log(vocab_size), torch.full_like(a, -math.inf))
    nll = -torch.logaddexp(log_keep[None, :] + logp[:, None], log_floor[None, :].expand(len(logp), -1)) / LN2
    zero = torch.zeros((), dtype=torch.float64)
    nll = torch.where(valid[:, None], nll, zero)
    logp = torch.where(valid, logp, zero)
    rank = torch.where(valid, rank, torch.zeros_like(rank))
    return nll.to(torch.float32), logp.to(torch.float32), rank.to(torch.int32)
