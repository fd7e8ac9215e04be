"""CUDA backend of the fused smoothed loss (csrc/cuda/smoothed_nll.cu) against the reference.

Needs a GPU and a CUDA build of tokenbounds._C; skipped otherwise (the kernels are still compiled
by `make check-cuda`). Sizes cover the real vocabularies (32000, 50257) and values that are not a
multiple of any block or vector width, misaligned row strides and the chunked linear path.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tokenbounds
import torch
from _linear_oracle import assert_linear_matches_oracle
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenbounds.ops._dispatch import has_op
from tokenbounds.ops.losses import smoothing_constants
from tokenbounds.reference import smoothed_nll_reference

IGNORE = -100
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALPHAS = (0.0, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0)


def _cuda_ready(op: str) -> bool:
    return torch.cuda.is_available() and has_op(op, "cuda")


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _cuda_ready("smoothed_nll"), reason="needs a GPU and the CUDA extension"),
]


def _alphas() -> torch.Tensor:
    return torch.tensor(ALPHAS, dtype=torch.float64, device="cuda")


def _assert_close(losses, ref, *, atol_nats: float = 5e-5, exact_rank: bool = True) -> None:
    ref_nll, ref_logp, ref_rank = ref
    assert losses.nll_bits.dtype == torch.float32 and losses.rank.dtype == torch.int32
    assert losses.nll_bits.is_cuda and losses.logp.is_cuda and losses.rank.is_cuda
    torch.testing.assert_close(losses.logp, ref_logp, rtol=1e-5, atol=atol_nats)
    torch.testing.assert_close(losses.nll_bits, ref_nll, rtol=1e-5, atol=atol_nats / math.log(2))
    if exact_rank:
        assert torch.equal(losses.rank, ref_rank)


@st.composite
def row_cases(draw):
    n = draw(st.integers(0, 300))
    vocab = draw(st.one_of(st.sampled_from([1, 2, 7, 1000, 4097, 32000, 50257, 70000]),
                           st.integers(1, 5000)))
    pad = draw(st.sampled_from([0, 1, 3, 13]))  # odd pads misalign rows for the vector loads
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, vocab + pad)) * (3.0 if scale == 1e4 else scale)
    rows = np.arange(n)
    if scale == 1e4 and n:
        x[rows, g.integers(0, vocab, n)] = 1e4
    targets = g.integers(0, vocab, n)
    if n:
        targets[g.random(n) < 0.1] = 0
        targets[g.random(n) < 0.1] = vocab - 1
        targets[g.random(n) < 0.1] = IGNORE
    safe = np.where(targets == IGNORE, 0, targets)
    if n and draw(st.booleans()):
        mask = g.random((n, vocab)) < 0.3
        mask[rows, safe] = False
        x[:, :vocab][mask] = -np.inf
    if n and vocab > 1:
        tie = g.random(n) < 0.3
        x[rows[tie], g.integers(0, vocab, n)[tie]] = x[rows[tie], safe[tie]]
    x[:, vocab:] = np.nan  # padded columns must never be read
    logits = torch.tensor(x, dtype=torch.float32).to(dtype).cuda()
    return logits, torch.tensor(targets, dtype=torch.int64).cuda(), vocab


@settings(max_examples=60)
@given(case=row_cases())
def test_rows_match_reference(case):
    logits, targets, vocab = case
    ref = smoothed_nll_reference(logits, targets, _alphas(), vocab, IGNORE)
    losses = tokenbounds.smoothed_nll(logits, targets, ALPHAS, vocab_size=vocab, backend="cuda")
    _assert_close(losses, ref)
    # A sliced view (row stride > V_padded, rows not 16-byte aligned) gives the same result.
    if logits.shape[0]:
        wide = torch.full((logits.shape[0], logits.shape[1] + 5), float("nan"), dtype=logits.dtype,
                          device="cuda")
        wide[:, 1 : logits.shape[1] + 1] = logits
        view = wide[:, 1 : logits.shape[1] + 1]
        again = tokenbounds.smoothed_nll(view, targets, ALPHAS, vocab_size=vocab, backend="cuda")
        _assert_close(again, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [50257, 32000])
def test_rows_adversarial(dtype, vocab):
    x = torch.randn(9, vocab + 3) * 2
    t = torch.randint(1, vocab - 1, (9,))
    x[0, 5], t[0] = 1e4, 5
    x[1, 6], t[1] = 1e4, 7
    x[2, t[2]] = -math.inf
    x[3, :] = 0.25
    t[4], t[5], t[6] = 0, vocab - 1, IGNORE
    x[7, : vocab // 2] = -math.inf
    t[7] = vocab - 2
    x[8, :vocab] = 1e4
    x[8, 0], t[8] = -1e4, 0
    x[:, vocab:] = float("nan")
    logits, targets = x.to(dtype).cuda(), t.cuda()
    ref = smoothed_nll_reference(logits, targets, _alphas(), vocab, IGNORE)
    losses = tokenbounds.smoothed_nll(logits, targets, ALPHAS, vocab_size=vocab, backend="cuda")
    _assert_close(losses, ref)
    assert losses.rank[8] == vocab - 1 and losses.logp[2] == -math.inf
    assert math.isinf(losses.nll_bits[2, 0]) and torch.isfinite(losses.nll_bits[2, 1:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_bad_values_raise(dtype):
    x = torch.randn(5, 4000).to(dtype).cuda()
    x[0, 17] = float("nan")
    x[1, 3999] = math.inf
    x[2, :] = -math.inf
    x[4, 0] = float("nan")  # ignored row
    t = torch.tensor([1, 2, 3, 4, IGNORE]).cuda()
    with pytest.raises(ValueError, match="3 rows"):
        tokenbounds.smoothed_nll(x, t, backend="cuda")
    keep, floor = smoothing_constants(ALPHAS, 4000, "cuda")
    nll, logp, rank = torch.ops.tokenbounds.smoothed_nll(x, t, keep, floor, 4000, IGNORE)
    assert torch.isnan(logp[:3]).all() and torch.isfinite(logp[3]) and logp[4] == 0


# ------------------------------------------------------------------------------ fused linear

linear_ready = pytest.mark.skipif(not _cuda_ready("linear_smoothed_nll"),
                                  reason="the CUDA linear_smoothed_nll kernel is not built")


@st.composite
def linear_cases(draw):
    n = draw(st.integers(0, 300))
    d = draw(st.one_of(st.integers(1, 70), st.sampled_from([128, 257])))
    vocab = draw(st.integers(1, 5000))
    pad = draw(st.sampled_from([0, 5]))
    dtype = draw(st.sampled_from(DTYPES))
    exact = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = np.random.default_rng(seed)
    if exact:  # small integers: logits exact in float32, so ranks and ties are exact
        h = g.integers(-3, 4, (n, d)).astype(np.float32)
        w = g.integers(-3, 4, (vocab + pad, d)).astype(np.float32)
    else:
        h = g.standard_normal((n, d)).astype(np.float32) * 2
        w = g.standard_normal((vocab + pad, d)).astype(np.float32) / math.sqrt(d)
    w[vocab:] = 50.0
    bias = None
    if draw(st.booleans()):
        bias = g.integers(-2, 3, vocab + pad) if exact else g.standard_normal(vocab + pad)
        bias = torch.tensor(bias, dtype=torch.float32).to(dtype).cuda()
    targets = g.integers(0, vocab, n)
    if n:
        targets[g.random(n) < 0.1] = IGNORE
        targets[g.random(n) < 0.1] = vocab - 1
    max_bytes = draw(st.sampled_from([None, 1, 20_000]))  # tiny budgets force row chunks
    return (torch.tensor(h).to(dtype).cuda(), torch.tensor(w).to(dtype).cuda(), bias,
            torch.tensor(targets, dtype=torch.int64).cuda(), vocab, max_bytes)


@linear_ready
@settings(max_examples=40)
@given(case=linear_cases())
def test_linear_matches_reference(case):
    hidden, weight, bias, targets, vocab, max_bytes = case
    losses = tokenbounds.linear_smoothed_nll(hidden, weight, targets, ALPHAS, bias=bias, vocab_size=vocab,
                                             max_bytes=max_bytes, backend="cuda")
    assert losses.logp.is_cuda
    assert_linear_matches_oracle(losses, hidden, weight, bias, targets, ALPHAS, vocab, IGNORE)


@linear_ready
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_memory_is_not_n_by_v(dtype):
    n, d, vocab = 4096, 256, 32000
    hidden = torch.randn(n, d, device="cuda").to(dtype)
    weight = (torch.randn(vocab, d, device="cuda") / 16).to(dtype)
    targets = torch.randint(0, vocab, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    losses = tokenbounds.linear_smoothed_nll(hidden, weight, targets, backend="cuda")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 0.1 * n * vocab * 4
    ref = smoothed_nll_reference(hidden.float() @ weight.float().T, targets,
                                 torch.tensor(tokenbounds.DEFAULT_ALPHAS, dtype=torch.float64,
                                              device="cuda"), vocab, IGNORE)
    _assert_close(losses, ref, atol_nats=2e-3, exact_rank=False)


@linear_ready
def test_linear_bad_rows_raise():
    hidden = torch.randn(4, 32, device="cuda")
    weight = torch.randn(1000, 32, device="cuda")
    hidden[1, 0] = float("nan")
    t = torch.tensor([1, 2, IGNORE, 999], device="cuda")
    with pytest.raises(ValueError, match="1 rows"):
        tokenbounds.linear_smoothed_nll(hidden, weight, t, backend="cuda")


@linear_ready
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_cuda(dtype):
    """Schema, fake kernel vs the CUDA kernels, AOT dispatch (torch.library.opcheck)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 40, generator=g).to(dtype).cuda()
    w = torch.randn(1003, 40, generator=g).to(dtype).cuda()
    b = torch.randn(1003, generator=g).to(dtype).cuda()
    t = torch.randint(0, 1000, (37,), generator=g).cuda()
    t[3] = IGNORE
    keep, floor = smoothing_constants(ALPHAS, 1000, "cuda")
    logits = (h.float() @ w.float().T).to(dtype)
    torch.library.opcheck(torch.ops.tokenbounds.smoothed_nll.default, (logits, t, keep, floor, 1000, IGNORE))
    for bias in (b, None):
        torch.library.opcheck(torch.ops.tokenbounds.linear_smoothed_nll.default,
                              (h, w, bias, t, keep, floor, 1000, IGNORE, 2**24))
