"""Triton backend of the fused smoothed loss against the float64 reference.

Runs under TRITON_INTERPRET=1 on CPU tensors (set by conftest when there is no GPU), and on CUDA
tensors when a GPU is present. Sizes are small: the interpreter runs every program in Python.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tokenbounds
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenbounds.ops._dispatch import triton_runs_on
from tokenbounds.ops.losses import smoothing_constants
from tokenbounds.reference import smoothed_nll_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IGNORE = -100
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALPHAS = (0.0, 1e-4, 1e-2, 0.1, 0.5, 1.0)

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not triton_runs_on(DEVICE), reason="triton cannot run here (set TRITON_INTERPRET=1)"),
]

if triton_runs_on(DEVICE):
    from tokenbounds.triton_kernels.smoothed_nll import (
        linear_smoothed_nll_triton,
        smoothed_nll_triton,
    )


def _alphas(values=ALPHAS) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=DEVICE)


def _consts(vocab: int, values=ALPHAS) -> tuple[torch.Tensor, torch.Tensor]:
    """log(1 - a), log(a / V): what the dispatcher passes to every backend."""
    return smoothing_constants(values, vocab, DEVICE)


def _assert_close(out, ref, *, atol_nats: float = 5e-5, exact_rank: bool = True) -> None:
    nll, logp, rank = out
    ref_nll, ref_logp, ref_rank = ref
    assert nll.dtype == torch.float32 and logp.dtype == torch.float32 and rank.dtype == torch.int32
    assert nll.shape == ref_nll.shape and logp.shape == ref_logp.shape and rank.shape == ref_rank.shape
    # Infinities must match exactly (assert_close compares them by sign); NaN never expected here.
    torch.testing.assert_close(logp.cpu(), ref_logp.cpu(), rtol=1e-5, atol=atol_nats)
    torch.testing.assert_close(nll.cpu(), ref_nll.cpu(), rtol=1e-5, atol=atol_nats / math.log(2))
    if exact_rank:
        assert torch.equal(rank.cpu(), ref_rank.cpu())


@st.composite
def row_cases(draw):
    """(logits [N, V_padded] possibly with row stride > V_padded, targets, vocab_size)."""
    n = draw(st.integers(0, 64))
    vocab = draw(st.one_of(st.integers(1, 40), st.integers(41, 3000)))
    pad = draw(st.integers(0, 5))
    extra_stride = draw(st.sampled_from([0, 3]))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    neg_inf_frac = draw(st.sampled_from([0.0, 0.3]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, vocab + pad + extra_stride)) * scale
    if scale == 1e4:  # peaked rows: one dominant logit, the rest far below
        x = g.standard_normal(x.shape) * 3.0
        if n:
            x[np.arange(n), g.integers(0, vocab, n)] = 1e4
    targets = g.integers(0, vocab, n)
    if n:
        targets[g.random(n) < 0.15] = 0
        targets[g.random(n) < 0.15] = vocab - 1
        targets[g.random(n) < 0.15] = IGNORE
    rows = np.arange(n)
    safe = np.where(targets == IGNORE, 0, targets)
    if neg_inf_frac and n:
        mask = g.random((n, vocab)) < neg_inf_frac
        mask[rows, safe] = False  # keep the target finite: every row has a finite logit
        x[:, :vocab][mask] = -np.inf
    if n and vocab > 1:  # ties with the target logit
        tie_rows = g.random(n) < 0.3
        tie_cols = g.integers(0, vocab, n)
        x[rows[tie_rows], tie_cols[tie_rows]] = x[rows[tie_rows], safe[tie_rows]]
    # Padded columns hold garbage that must never be read as logits.
    x[:, vocab:vocab + pad] = np.where(g.random((n, pad)) < 0.5, np.inf, np.nan)
    buf = torch.tensor(x, dtype=torch.float32).to(dtype).to(DEVICE)
    logits = buf[:, : vocab + pad]  # row stride vocab + pad + extra_stride
    return logits, torch.tensor(targets, dtype=torch.int64, device=DEVICE), vocab


@settings(max_examples=60)
@given(case=row_cases(), block=st.sampled_from([None, 64, 256]))
def test_rows_match_reference(case, block):
    logits, targets, vocab = case
    alphas = _alphas()
    ref = smoothed_nll_reference(logits, targets, alphas, vocab, IGNORE)
    out = smoothed_nll_triton(logits, targets, *_consts(vocab), vocab, IGNORE, block=block)
    _assert_close(out, ref)
    if block is None:  # the public API with the backend forced runs the same kernel
        losses = tokenbounds.smoothed_nll(logits, targets, ALPHAS, vocab_size=vocab, backend="triton")
        assert torch.equal(losses.nll_bits, out[0]) and torch.equal(losses.rank, out[2])
        assert torch.equal(losses.logp, out[1])
        assert torch.equal(losses.valid, targets != IGNORE)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # -inf - -inf in masked-out lanes
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_adversarial(dtype):
    vocab, pad = 700, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, vocab + pad + 5, generator=g) * 2
    t = torch.randint(1, vocab - 1, (10,), generator=g)
    x[0, 5], t[0] = 1e4, 5  # peaked at the target: log p = 0 up to rounding
    x[1, 6], t[1] = 1e4, 7  # peaked elsewhere: log p ~ -1e4, p underflows, nll stays finite
    x[2, t[2]] = -math.inf  # target logit -inf: log p = -inf, unsmoothed nll = inf
    x[3, :] = 0.25  # all tied: log p = -log V, rank 0
    t[4] = 0
    t[5] = vocab - 1
    t[6] = IGNORE
    x[7, : vocab // 2] = -math.inf
    t[7] = vocab - 2
    x[8, :vocab] = 1e4
    x[8, 0], t[8] = -1e4, 0  # target far below every other logit: rank V - 1
    x[9, :vocab:7] = x[9, t[9]]  # many ties with the target
    x[:, vocab:] = float("nan")  # padding and the bytes beyond the row end are never read
    x[:2, vocab:] = math.inf
    buf = x.to(dtype).to(DEVICE)
    logits = buf[:, : vocab + pad]
    targets = t.to(DEVICE)
    alphas = _alphas()
    ref = smoothed_nll_reference(logits, targets, alphas, vocab, IGNORE)
    for block in (None, 128):
        out = smoothed_nll_triton(logits, targets, *_consts(vocab), vocab, IGNORE, block=block)
        _assert_close(out, ref)
    nll, logp, rank = out
    assert math.isinf(nll[2, 0]) and nll[2, 0] > 0 and torch.isfinite(nll[2, 1:]).all()
    assert logp[2] == -math.inf and logp[6] == 0 and rank[6] == 0 and (nll[6] == 0).all()
    assert rank[8] == vocab - 1 and rank[0] == 0 and rank[3] == 0
    assert abs(float(logp[3]) + math.log(vocab)) < 1e-5
    assert torch.isfinite(nll[1]).all() and nll[1, 0] > 1e4


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN arithmetic in the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_bad_values_give_nan_and_api_raises(dtype):
    vocab = 300
    x = torch.randn(5, vocab).to(dtype)
    t = torch.tensor([1, 2, 3, 4, IGNORE])
    x[0, 17] = float("nan")
    x[1, 250] = math.inf
    x[2, :] = -math.inf
    x[4, 3] = float("nan")  # ignored row: not an error
    logits, targets = x.to(DEVICE), t.to(DEVICE)
    nll, logp, rank = smoothed_nll_triton(logits, targets, *_consts(vocab), vocab, IGNORE)
    assert torch.isnan(logp[:3]).all() and torch.isnan(nll[:3]).all()
    assert torch.isfinite(logp[3]) and logp[4] == 0 and (nll[4] == 0).all()
    with pytest.raises(ValueError, match="3 rows"):
        tokenbounds.smoothed_nll(logits, targets, vocab_size=vocab, backend="triton")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_one_row_per_program_as_on_gpu():
    vocab = 300
    x = torch.randn(5, vocab) * 4
    x[3, 5] = -math.inf
    t = torch.tensor([0, vocab - 1, IGNORE, 5, 7])
    x, t = x.to(DEVICE), t.to(DEVICE)
    ref = smoothed_nll_reference(x, t, _alphas(), vocab, IGNORE)
    _assert_close(smoothed_nll_triton(x, t, *_consts(vocab), vocab, IGNORE, block=64, rows_per_program=1), ref)
    h, w = torch.randn(5, 20, device=DEVICE), torch.randn(vocab, 20, device=DEVICE)
    _, ref = _linear_reference(h, w, t, _alphas(), vocab)
    out = linear_smoothed_nll_triton(h, w, None, t, *_consts(vocab), vocab, IGNORE, rows_per_program=1)
    _assert_close(out, ref, atol_nats=2e-4, exact_rank=False)


def test_rows_empty_and_no_alphas():
    x = torch.randn(0, 50, device=DEVICE)
    t = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    nll, logp, rank = smoothed_nll_triton(x, t, *_consts(50), 50, IGNORE)
    assert nll.shape == (0, len(ALPHAS)) and logp.shape == (0,) and rank.shape == (0,)
    x = torch.randn(3, 50, device=DEVICE)
    t = torch.tensor([0, 49, 7], device=DEVICE)
    out = smoothed_nll_triton(x, t, *_consts(50, ()), 50, IGNORE)
    _assert_close(out, smoothed_nll_reference(x, t, _alphas(()), 50, IGNORE))
    assert out[0].shape == (3, 0)


# ------------------------------------------------------------------------------ fused linear


def _linear_reference(hidden, weight, targets, alphas, vocab, bias=None):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return logits, smoothed_nll_reference(logits, targets, alphas, vocab, IGNORE)


def _near_ties(logits64, targets, vocab, tol):
    """Per row: how many non-target logits lie within tol of the target logit."""
    x = logits64[:, :vocab]
    safe = torch.where(targets == IGNORE, torch.zeros_like(targets), targets)
    xt = x.gather(1, safe[:, None])
    close = (x - xt).abs() <= tol * (1 + xt.abs())
    return close.sum(1) - 1


@st.composite
def linear_cases(draw):
    n = draw(st.integers(0, 64))
    d = draw(st.integers(1, 64))
    vocab = draw(st.integers(1, 300))
    pad = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from(DTYPES))
    integer_valued = draw(st.booleans())  # exact logits: exact ranks, exact ties
    seed = draw(st.integers(0, 2**31 - 1))
    g = np.random.default_rng(seed)
    if integer_valued:
        h = g.integers(-3, 4, (n, d)).astype(np.float32)
        w = g.integers(-3, 4, (vocab + pad, d)).astype(np.float32)
    else:
        h = g.standard_normal((n, d)).astype(np.float32) * 2
        w = g.standard_normal((vocab + pad, d)).astype(np.float32) / math.sqrt(d)
    w[vocab:] = 50.0  # padded vocabulary rows would dominate if they were not masked
    bias = None
    if draw(st.booleans()):
        bias = g.integers(-2, 3, vocab + pad).astype(np.float32) if integer_valued else g.standard_normal(vocab + pad)
        bias = torch.tensor(bias, dtype=torch.float32).to(dtype).to(DEVICE)
    targets = g.integers(0, vocab, n)
    if n:
        targets[g.random(n) < 0.15] = 0
        targets[g.random(n) < 0.15] = vocab - 1
        targets[g.random(n) < 0.15] = IGNORE
    hidden = torch.tensor(h).to(dtype).to(DEVICE)
    weight = torch.tensor(w).to(dtype).to(DEVICE)
    return hidden, weight, bias, torch.tensor(targets, dtype=torch.int64, device=DEVICE), vocab, integer_valued


@settings(max_examples=40)
@given(case=linear_cases(), blocks=st.sampled_from([(None, None, None), (16, 32, 16)]),
       max_bytes=st.sampled_from([None, 1, 2000]))
def test_linear_matches_reference(case, blocks, max_bytes):
    hidden, weight, bias, targets, vocab, exact = case
    alphas = _alphas()
    logits64, ref = _linear_reference(hidden, weight, targets, alphas, vocab, bias)
    bn, bv, bd = blocks
    out = linear_smoothed_nll_triton(hidden, weight, bias, targets, *_consts(vocab), vocab, IGNORE,
                                     max_bytes=max_bytes, block_n=bn, block_v=bv, block_d=bd)
    _assert_close(out, ref, atol_nats=2e-4, exact_rank=exact)
    if not exact:  # accumulation order may flip logits within rounding of the target's
        slack = _near_ties(logits64, targets, vocab, 1e-5).cpu()
        diff = (out[2].cpu().long() - ref[2].cpu().long()).abs()
        assert (diff <= slack.clamp(min=0)).all()
    if bn is None and max_bytes is None:
        losses = tokenbounds.linear_smoothed_nll(hidden, weight, targets, ALPHAS, bias=bias,
                                                 vocab_size=vocab, backend="triton")
        assert torch.equal(losses.nll_bits, out[0]) and torch.equal(losses.rank, out[2])


def test_linear_never_allocates_n_by_v(monkeypatch):
    n, d, vocab = 64, 16, 3000
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, d, generator=g).to(DEVICE)
    weight = torch.randn(vocab, d, generator=g).to(DEVICE)
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    sizes = []
    real_empty = torch.empty

    def recording_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        sizes.append(t.numel())
        return t

    monkeypatch.setattr(torch, "empty", recording_empty)
    out = linear_smoothed_nll_triton(hidden, weight, None, targets, *_consts(vocab), vocab, IGNORE)
    assert sizes and max(sizes) <= n * vocab // 64  # partial buffers: N x ceil(V / 128)
    sizes.clear()  # a budget below the full workspace gives chunks of one row tile
    chunked = linear_smoothed_nll_triton(hidden, weight, None, targets, *_consts(vocab), vocab, IGNORE,
                                         max_bytes=3000, block_n=16)
    monkeypatch.undo()
    assert max(sizes) <= 16 * math.ceil(vocab / 128)
    for a, b in zip(chunked, out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    _, ref = _linear_reference(hidden, weight, targets, _alphas(), vocab)
    _assert_close(out, ref, atol_nats=2e-4, exact_rank=False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN arithmetic in the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_bad_values_and_ignored_rows(dtype):
    n, d, vocab = 6, 8, 100
    hidden = torch.randn(n, d)
    weight = torch.randn(vocab, d)
    hidden[1, 3] = float("nan")
    hidden[2, 0] = math.inf
    weight[40] = 0.0  # logit exactly 0 (and inf * 0 = NaN in row 2)
    targets = torch.tensor([3, 4, 5, IGNORE, 0, vocab - 1])
    hidden, weight, targets = hidden.to(dtype).to(DEVICE), weight.to(dtype).to(DEVICE), targets.to(DEVICE)
    nll, logp, rank = linear_smoothed_nll_triton(hidden, weight, None, targets, *_consts(vocab), vocab, IGNORE,
                                                 block_n=16, block_v=32, block_d=16)
    assert torch.isnan(logp[1:3]).all() and torch.isnan(nll[1:3]).all()
    assert logp[3] == 0 and rank[3] == 0 and (nll[3] == 0).all()
    good = torch.tensor([0, 4, 5])
    logits = hidden.double() @ weight.double().T
    ref = smoothed_nll_reference(logits[good], targets[good], _alphas(), vocab, IGNORE)
    _assert_close((nll[good], logp[good], rank[good]), ref, atol_nats=2e-4, exact_rank=False)
    with pytest.raises(ValueError, match="2 rows"):
        tokenbounds.linear_smoothed_nll(hidden, weight, targets, vocab_size=vocab, backend="triton")


def test_linear_empty():
    hidden = torch.randn(0, 8, device=DEVICE)
    weight = torch.randn(20, 8, device=DEVICE)
    t = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    nll, logp, rank = linear_smoothed_nll_triton(hidden, weight, None, t, *_consts(20), 20, IGNORE)
    assert nll.shape == (0, len(ALPHAS)) and logp.shape == (0,) and rank.shape == (0,)
