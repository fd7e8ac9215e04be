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
from ._dispatch import extension, has_op, resolve_backend

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_MAX_BYTES_CPU = 64 * 2**20
DEFAULT_MAX_BYTES_CUDA = 512 * 2**20


def _register_fakes() -> None:
    """Meta/fake kernels so the ops trace under torch.compile (DESIGN.md "Custom ops")."""
    if extension() is None or not hasattr(torch.ops.tokenbounds, "smoothed_nll"):
        return

    @torch.library.register_fake("tokenbounds::smoothed_nll")
    def _(logits, targets, alphas, vocab_size, ignore_index):
        n = logits.shape[0]
        return (
            logits.new_empty((n, alphas.shape[0]), dtype=torch.float32),
            logits.new_empty((n,), dtype=torch.float32),
            logits.new_empty((n,), dtype=torch.int32),
        )


def _register_linear_fake() -> None:
    if extension() is None or not has_op("linear_smoothed_nll", "cuda"):
        return

    @torch.library.register_fake("tokenbounds::linear_smoothed_nll")
    def _(hidden, weight, targets, alphas, vocab_size, ignore_index, max_bytes):
        n = hidden.shape[0]
        return (
            hidden.new_empty((n, alphas.shape[0]), dtype=torch.float32),
            hidden.new_empty((n,), dtype=torch.float32),
            hidden.new_empty((n,), dtype=torch.int32),
        )


try:
    _register_fakes()
    _register_linear_fake()
except RuntimeError:  # already registered (module reloaded)
    pass


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


def _run_rows(logits2d, targets1d, alphas_t, vocab_size, ignore_index, backend):
    if backend == "reference":
        return reference.smoothed_nll_reference(logits2d, targets1d, alphas_t, vocab_size, ignore_index)
    if backend == "triton":
        from ..triton_kernels.smoothed_nll import smoothed_nll_triton

        return smoothed_nll_triton(logits2d, targets1d, alphas_t, vocab_size, ignore_index)
    return torch.ops.tokenbounds.smoothed_nll(logits2d, targets1d, alphas_t, vocab_size, ignore_index)


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
    alphas_t = torch.tensor(alpha_values, dtype=torch.float64, device=logits.device)
    valid = flat_targets != ignore_index
    nll_bits, logp, rank = _run_rows(logits2d, flat_targets, alphas_t, vocab, int(ignore_index), chosen)
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
        max_bytes: cap on the extra memory for logit tiles (default 64 MiB on CPU, 512 MiB on
            CUDA). On CPU, rows are processed in chunks of ``max_bytes / (V_padded * itemsize)``.
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
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    n = hidden2d.shape[0]
    valid = flat_targets != ignore_index
    chosen = resolve_backend("smoothed_nll", hidden.device, backend)
    alphas_t = torch.tensor(alpha_values, dtype=torch.float64, device=hidden.device)

    if chosen == "cuda" and bias is None and has_op("linear_smoothed_nll", "cuda"):
        budget = max_bytes or DEFAULT_MAX_BYTES_CUDA
        nll_bits, logp, rank = torch.ops.tokenbounds.linear_smoothed_nll(
            hidden2d.contiguous(), weight.contiguous(), flat_targets, alphas_t, vocab, int(ignore_index), budget
        )
    elif chosen == "triton" and bias is None:
        from ..triton_kernels.smoothed_nll import linear_smoothed_nll_triton

        nll_bits, logp, rank = linear_smoothed_nll_triton(
            hidden2d.contiguous(), weight.contiguous(), flat_targets, alphas_t, vocab, int(ignore_index),
            max_bytes=max_bytes or DEFAULT_MAX_BYTES_CUDA,
        )
    else:
        # Row chunks: each chunk's logits (rows x V_padded) are computed by one GEMM and reduced
        # at once; only one chunk is alive at a time, so extra memory stays under max_bytes.
        budget = max_bytes or (DEFAULT_MAX_BYTES_CUDA if hidden.is_cuda else DEFAULT_MAX_BYTES_CPU)
        rows = max(1, budget // (padded * hidden.element_size()))
        nll_bits = torch.empty((n, len(alpha_values)), dtype=torch.float32, device=hidden.device)
        logp = torch.empty((n,), dtype=torch.float32, device=hidden.device)
        rank = torch.empty((n,), dtype=torch.int32, device=hidden.device)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            h = hidden2d[start:stop]
            chunk = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
            out = _run_rows(chunk, flat_targets[start:stop], alphas_t, vocab, int(ignore_index), chosen)
            nll_bits[start:stop], logp[start:stop], rank[start:stop] = out
            del chunk
    _raise_on_bad_rows(logp, valid, "hidden @ weight.T")
    return TokenLosses(nll_bits=nll_bits, logp=logp, rank=rank, valid=valid,
                       alphas=alpha_values, vocab_size=vocab)
