"""Fused softmax + prediction smoothing + log-loss: validation and dispatch.

smoothed_nll never materialises the N x V probability matrix; linear_smoothed_nll never
materialises the N x V logits beyond ``max_bytes`` at a time.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .. import reference
from ..losses import DEFAULT_ALPHAS, TokenLosses
from ._dispatch import extension, resolve_backend

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_MAX_BYTES_CPU = 64 * 2**20
DEFAULT_MAX_BYTES_CUDA = 512 * 2**20


def smoothing_constants(alphas: Sequence[float], vocab_size: int,
                        device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(log(1 - a), log(a / V)) as float64 tensors on ``device``: the per-call constants every
    backend receives (tokenbounds/smoothed_loss.h, computed by the extension; by the reference
    oracle's formula when the extension is not built)."""
    ext = extension()
    if ext is not None:
        keep, floor = ext.smoothing_constants(tuple(float(a) for a in alphas), int(vocab_size))
        both = torch.tensor([keep, floor], dtype=torch.float64).reshape(2, len(keep))
    else:
        both = torch.stack(reference.smoothing_constants_reference(alphas, vocab_size))
    both = both.to(device)
    return both[0], both[1]


def _check_alphas(alphas) -> tuple[float, ...]:
    if isinstance(alphas, numbers.Real):
        alphas = (alphas,)
    if isinstance(alphas, torch.Tensor):
        alphas = alphas.detach().cpu().reshape(-1).tolist()
    if not isinstance(alphas, Sequence):
        raise TypeError(f"alphas must be a float or a sequence of floats, got {type(alphas).__name__}")
    out = []
    for a in alphas:
        a = float(a)
        if not (0.0 <= a <= 1.0) or math.isnan(a):
            raise ValueError(f"every alpha must lie in [0, 1] (0 = unsmoothed), got {a}")
        out.append(a)
    return tuple(out)


def _check_vocab_size(vocab_size, padded: int, what: str) -> int:
    if vocab_size is None:
        return padded
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= padded:
        raise ValueError(
            f"vocab_size={vocab_size} must be between 1 and {what} = {padded} "
            "(the true vocabulary size when the last dimension is padded)"
        )
    return int(vocab_size)


def _check_targets(targets, lead_shape, device, vocab_size: int, ignore_index: int) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"targets must be an integer tensor (int64), got {targets.dtype}")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(
            f"targets.shape {tuple(targets.shape)} must equal the leading dimensions "
            f"{tuple(lead_shape)} of the scores (one target per position)"
        )
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device} but the scores are on {device}; move them to one device")
    flat = targets.reshape(-1).to(torch.int64).contiguous()
    if flat.numel():
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab_size))
        if bool(bad.any()):
            values = flat[bad]
            raise ValueError(
                f"{int(bad.sum())} targets are out of range [0, {vocab_size}) and are not "
                f"ignore_index={ignore_index} (e.g. {int(values[0])}, max {int(values.max())}); "
                f"vocabulary size is {vocab_size}; pass ignore_index for padding"
            )
    return flat


def _raise_on_bad_rows(logp: torch.Tensor, valid: torch.Tensor, name: str) -> None:
    bad = torch.isnan(logp) & valid
    if bool(bad.any()):
        rows = torch.nonzero(bad)[:, 0]
        raise ValueError(
            f"{int(rows.numel())} rows of {name} contain NaN (or have no finite value), first at "
            f"flattened row {int(rows[0])}; check the model output (e.g. overflow in fp16)"
        )


def _run_rows(logits2d, targets1d, alpha_values, vocab_size, ignore_index, backend):
    if backend == "reference":
        alphas_t = torch.tensor(alpha_values, dtype=torch.float64)
        return reference.smoothed_nll_reference(logits2d, targets1d, alphas_t, vocab_size, ignore_index)
    log_keep, log_floor = smoothing_constants(alpha_values, vocab_size, logits2d.device)
    if backend == "triton":
        from ..triton_kernels.smoothed_nll import smoothed_nll_triton

        return smoothed_nll_triton(logits2d, targets1d, log_keep, log_floor, vocab_size, ignore_index)
    return torch.ops.tokenbounds.smoothed_nll(logits2d, targets1d, log_keep, log_floor, vocab_size, ignore_index)


def smoothed_nll(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alphas=DEFAULT_ALPHAS,
    *,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    backend: str | None = None,
) -> TokenLosses:
    """Smoothed per-token log-loss in bits for every smoothing level, plus log p_y and rank.

    nll_bits[i, j] = -log2((1 - a_j) softmax(logits_i)[y_i] + a_j / V) (Lotfi et al. 2024,
    prediction smoothing; a = 0 is the plain loss), computed in log space so it stays finite when
    p_y underflows. rank[i] = number of logits strictly greater than the target's logit.

    Args:
        logits: [..., V_padded] float32 / bfloat16 / float16.
        targets: [...] integer token ids; entries equal to ``ignore_index`` are skipped.
        alphas: smoothing levels in [0, 1].
        vocab_size: the true V when the last dimension is padded (padded columns are ignored and
            a / V uses the true V). Default: logits.shape[-1].
        backend: force "cuda", "triton", "cpu" or "reference" (default: automatic).
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float32, bfloat16 or float16, got {logits.dtype}; "
            "cast with .float() (float64 inputs gain nothing: the kernels accumulate in float32/64)"
        )
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
    alpha_values = _check_alphas(alphas)
    vocab = _check_vocab_size(vocab_size, logits.shape[-1], "logits.shape[-1]")
    flat_targets = _check_targets(targets, logits.shape[:-1], logits.device, vocab, ignore_index)
    logits2d = logits.reshape(-1, logits.shape[-1])
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    chosen = resolve_backend("smoothed_nll", logits.device, backend)
    valid = flat_targets != ignore_index
    nll_bits, logp, rank = _run_rows(logits2d, flat_targets, alpha_values, vocab, int(ignore_index), chosen)
    _raise_on_bad_rows(logp, valid, "logits")
    return TokenLosses(nll_bits=nll_bits, logp=logp, rank=rank, valid=valid,
                       alphas=alpha_values, vocab_size=vocab)


def linear_smoothed_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    alphas=DEFAULT_ALPHAS,
    *,
    bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    max_bytes: int | None = None,
    backend: str | None = None,
) -> TokenLosses:
    """:func:`smoothed_nll` of ``hidden @ weight.T (+ bias)`` without materialising the N x V logits.

    Args:
        hidden: [..., D] final hidden states (float32 / bfloat16 / float16).
        weight: [V_padded, D] LM-head weight, same dtype and device as hidden.
        bias: optional [V_padded].
        max_bytes: cap on the working memory for logit tiles (default 64 MiB on CPU, 512 MiB on
            CUDA). The CPU kernel (AVX2) never stores logits: it needs about 4 (D + 56) bytes per
            token of a block of at most 256 tokens per thread (1 MiB per thread at D = 1024) and
            uses smaller blocks under a smaller cap; its fallback (CPUs without AVX2) and the
            GPU kernels process rows in chunks whose logits (or partials) fit in ``max_bytes``.
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; cast one of them")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},)")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
        bias = bias.to(hidden.dtype)
    if max_bytes is not None and (not isinstance(max_bytes, numbers.Integral) or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    alpha_values = _check_alphas(alphas)
    padded = weight.shape[0]
    vocab = _check_vocab_size(vocab_size, padded, "weight.shape[0]")
    flat_targets = _check_targets(targets, hidden.shape[:-1], hidden.device, vocab, ignore_index)
    hidden2d = hidden.reshape(flat_targets.numel(), hidden.shape[-1])
    valid = flat_targets != ignore_index
    chosen = resolve_backend("linear_smoothed_nll", hidden.device, backend)
    budget = max_bytes or (DEFAULT_MAX_BYTES_CUDA if hidden.is_cuda else DEFAULT_MAX_BYTES_CPU)
    hidden2d, weight = hidden2d.contiguous(), weight.contiguous()
    if chosen == "reference":
        alphas_t = torch.tensor(alpha_values, dtype=torch.float64)
        nll_bits, logp, rank = reference.linear_smoothed_nll_reference(
            hidden2d, weight, bias, flat_targets, alphas_t, vocab, int(ignore_index), max_bytes=budget
        )
    else:
        log_keep, log_floor = smoothing_constants(alpha_values, vocab, hidden.device)
        if chosen == "triton":
            from ..triton_kernels.smoothed_nll import linear_smoothed_nll_triton

            nll_bits, logp, rank = linear_smoothed_nll_triton(
                hidden2d, weight, bias, flat_targets, log_keep, log_floor, vocab, int(ignore_index),
                max_bytes=budget,
            )
        else:
            nll_bits, logp, rank = torch.ops.tokenbounds.linear_smoothed_nll(
                hidden2d, weight, bias, flat_targets, log_keep, log_floor, vocab, int(ignore_index), budget
            )
    _raise_on_bad_rows(logp, valid, "hidden @ weight.T")
    return TokenLosses(nll_bits=nll_bits, logp=logp, rank=rank, valid=valid,
                       alphas=alpha_values, vocab_size=vocab)
