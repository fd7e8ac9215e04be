"""Fake (meta) kernels of every torch.ops.tokenbounds op, for torch.compile / FakeTensor tracing.

Registered once, unconditionally, whenever the extension loads (``_dispatch.extension``): every
schema exists on every build (csrc/ops.cpp), so every fake does too, whichever backends were
compiled. Each returns empty tensors of the shapes and dtypes the kernels return.
"""

from __future__ import annotations

import torch

OPS = (
    "smoothed_nll",
    "linear_smoothed_nll",
    "hadamard_transform",
    "gram_accumulate_",
    "rademacher_matmul",
    "rademacher_probes",
)

_registered = False


def _loss_outputs(like: torch.Tensor, n, num_alphas):
    return (
        like.new_empty((n, num_alphas), dtype=torch.float32),
        like.new_empty((n,), dtype=torch.float32),
        like.new_empty((n,), dtype=torch.int32),
    )


def register_all() -> None:
    """Register the fake kernel of every op in :data:`OPS` (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("tokenbounds::smoothed_nll")
    def _(logits, targets, log_keep, log_floor, vocab_size, ignore_index):
        return _loss_outputs(logits, logits.shape[0], log_keep.shape[0])

    @torch.library.register_fake("tokenbounds::linear_smoothed_nll")
    def _(hidden, weight, bias, targets, log_keep, log_floor, vocab_size, ignore_index, max_bytes):
        return _loss_outputs(hidden, hidden.shape[0], log_keep.shape[0])

    @torch.library.register_fake("tokenbounds::hadamard_transform")
    def _(x, hk, scale):
        return torch.empty_like(x)

    @torch.library.register_fake("tokenbounds::gram_accumulate_")
    def _(acc, x):
        return None

    @torch.library.register_fake("tokenbounds::rademacher_matmul")
    def _(x, seed, offset, k):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_empty((x.shape[0], k), dtype=dtype)

    @torch.library.register_fake("tokenbounds::rademacher_probes")
    def _(d, k, seed, offset, dtype):
        return torch.empty((d, k), dtype=dtype)


def registered_fakes() -> dict[str, bool]:
    """{op: whether a fake kernel is registered} for every op in :data:`OPS`."""
    from torch._library.simple_registry import singleton

    return {op: singleton.find(f"tokenbounds::{op}").fake_impl.kernel is not None for op in OPS}
