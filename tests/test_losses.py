"""smoothed_nll / linear_smoothed_nll on every CPU backend against the float64 oracle."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tokenbounds as tb
import torch
from _linear_oracle import assert_linear_matches_oracle
from hypothesis import given
from hypothesis import strategies as st
from tokenbounds import reference
from tokenbounds.ops._dispatch import has_op
from tokenbounds.ops._fakes import registered_fakes
from tokenbounds.ops.losses import smoothing_constants
from tokenbounds.reference import smoothed_nll_reference

CPU_BACKENDS = ["cpu", "reference"] if has_op("smoothed_nll", "cpu") else ["reference"]
ALPHAS = (0.0,) + tb.DEFAULT_ALPHAS + (1.0,)


def oracle(logits, targets, alphas=ALPHAS, vocab_size=None, ignore_index=-100):
    v = vocab_size or logits.shape[-1]
    a = torch.tensor(alphas, dtype=torch.float64)
    return smoothed_nll_reference(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), a, v, ignore_index)


def torch_same_dtype_logp(logits, targets, vocab_size):
    """log p_y as a same-dtype torch computation would give it (the error budget we must meet)."""
    x = logits[..., :vocab_size]
    lp = torch.log_softmax(x, dim=-1)
    return lp.gather(-1, targets.clamp(min=0)[..., None])[..., 0].float()


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


def assert_close_to_oracle(out, logits, targets, vocab_size=None, ignore_index=-100, alphas=ALPHAS):
    v = vocab_size or logits.shape[-1]
    nll_ref, logp_ref, rank_ref = oracle(logits, targets, alphas, v, ignore_index)
    valid = targets.reshape(-1) != ignore_index
    assert torch.equal(out.valid, valid)
    assert torch.equal(out.rank, rank_ref), "rank must be exact"
    # Error budget: what a same-dtype torch computation makes, plus float32 eps-scale slack.
    if logits.dtype == torch.float32:
        tol = 2e-5
    else:
        same = torch_same_dtype_logp(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), v)
        tol = 2e-5 + _max((same - logp_ref)[valid].abs().nan_to_num(0, 0, 0))
    finite = torch.isfinite(logp_ref)
    assert torch.equal(torch.isneginf(out.logp), torch.isneginf(logp_ref))
    rel = (out.logp - logp_ref).abs() / logp_ref.abs().clamp(min=1.0)
    assert _max(rel[finite]) <= tol
    inf_ref = torch.isinf(nll_ref)
    assert torch.equal(torch.isinf(out.nll_bits), inf_ref)
    rel = (out.nll_bits - nll_ref).abs() / nll_ref.abs().clamp(min=1.0)
    assert _max(rel[~inf_ref]) <= tol


@st.composite
def logits_case(draw):
    n = draw(st.integers(0, 40))
    v = draw(st.sampled_from([1, 2, 7, 15, 16, 17, 31, 33, 100, 257, 1000, 2047, 2049, 4099]))
    pad = draw(st.sampled_from([0, 0, 3, 64]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v + pad, generator=g) * scale
    t = torch.randint(0, v, (n,), generator=g)
    kind = draw(st.sampled_from(["plain", "neginf", "peaked", "ties", "edges", "ignore"]))
    if n:
        if kind == "neginf":
            x[torch.rand(n, v + pad, generator=g) < 0.3] = -math.inf
            x[torch.arange(n), t] = 0.0  # keep every row with a finite logit
            if n > 1:
                x[0, t[0]] = -math.inf  # target at -inf: p = 0, smoothed loss finite
                x[0, (t[0] + 1) % v] = 1.0
        elif kind == "peaked":
            x[torch.arange(n), t] = draw(st.sampled_from([1e3, 1e4, -1e4]))
        elif kind == "ties":
            x = torch.round(x)  # many exact ties with the target logit
        elif kind == "edges":
            t = torch.where(torch.rand(n, generator=g) < 0.5, 0, v - 1)
        elif kind == "ignore":
            t[torch.rand(n, generator=g) < 0.4] = -100
    x = x.to(dtype)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    return x, t, (v if pad else None)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(case=logits_case())
def test_smoothed_nll_matches_oracle(backend, case):
    x, t, vocab_size = case
    out = tb.smoothed_nll(x, t, ALPHAS, vocab_size=vocab_size, backend=backend)
    assert out.nll_bits.shape == (x.shape[0], len(ALPHAS))
    assert out.nll_bits.dtype == torch.float32 and out.logp.dtype == torch.float32
    assert out.rank.dtype == torch.int32
    assert_close_to_oracle(out, x, t, vocab_size)


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_every_simd_path_matches_oracle(isa):
    """The ISA is chosen per call from TOKENBOUNDS_CPU_ISA, so a subprocess covers each path."""
    if not has_op("smoothed_nll", "cpu"):
        pytest.skip("extension not built")
    code = (
        "import torch, tokenbounds as tb\n"
        "from tokenbounds.reference import smoothed_nll_reference as ref\n"
        "from tokenbounds import _C\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for v in (1, 9, 50257, 70000):\n"
        "    x = torch.randn(9, v, generator=g) * 4; t = torch.randint(0, v, (9,), generator=g)\n"
        "    x[0, :v // 2] = float('-inf'); x[1, t[1]] = 1e4; x[2, t[2]] = float('-inf'); x[2, 0] = 3.0\n"
        "    t[3] = -100\n"
        "    for dt in (torch.float32, torch.bfloat16, torch.float16):\n"
        "        xd = x.to(dt); out = tb.smoothed_nll(xd, t, (0.0, 1e-3, 0.5), backend='cpu')\n"
        "        r = ref(xd, t, torch.tensor([0.0, 1e-3, 0.5], dtype=torch.float64), v, -100)\n"
        "        assert torch.equal(out.rank, r[2]), (v, dt)\n"
        "        ok = torch.isfinite(r[1])\n"
        "        assert (out.logp - r[1])[ok].abs().max() < 1e-4 * max(1.0, float(r[1][ok].abs().max())), (v, dt)\n"
        # the fused head: the AVX2 GEMM, or the chunked BLAS fallback on the scalar path
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "from _linear_oracle import assert_linear_matches_oracle\n"
        "h = torch.randn(40, 300, generator=g); w = torch.randn(1001, 300, generator=g) / 17\n"
        "b = torch.randn(1001, generator=g); tt = torch.randint(0, 990, (40,), generator=g); tt[3] = -100\n"
        "out = tb.linear_smoothed_nll(h, w, tt, (0.0, 1e-3, 0.5), bias=b, vocab_size=990, backend='cpu')\n"
        "assert_linear_matches_oracle(out, h, w, b, tt, (0.0, 1e-3, 0.5), 990)\n"
        "hb, wb, bb = h.bfloat16(), w.bfloat16(), b.bfloat16()  # the fallback's GEMM rounds logits to bf16\n"
        "out = tb.linear_smoothed_nll(hb, wb, tt, (0.0, 0.5), bias=bb, vocab_size=990, backend='cpu')\n"
        "r = tb.linear_smoothed_nll(hb, wb, tt, (0.0, 0.5), bias=bb, vocab_size=990, backend='reference')\n"
        "assert (out.logp - r.logp).abs().max() < 0.05\n"
        "print(_C.cpu_isa())\n"
    )
    env = dict(os.environ, TOKENBOUNDS_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    if isa == "avx2" and "avx2" not in res.stdout:
        pytest.skip("CPU without AVX2")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_vocabularies(backend):
    g = torch.Generator().manual_seed(1)
    for v in (32000, 50257, 70000):
        x = torch.randn(6, v, generator=g) * 5
        t = torch.randint(0, v, (6,), generator=g)
        for dt in (torch.float32, torch.bfloat16):
            xd = x.to(dt)
            assert_close_to_oracle(tb.smoothed_nll(xd, t, ALPHAS, backend=backend), xd, t)


def test_known_values():
    # Uniform logits: p = 1/V, smoothing leaves p unchanged: every level gives log2 V bits.
    v = 50257
    out = tb.smoothed_nll(torch.zeros(3, v), torch.tensor([0, 5, v - 1]))
    assert torch.allclose(out.nll_bits, torch.full_like(out.nll_bits, math.log2(v)), rtol=1e-6)
    assert torch.all(out.rank == 0)  # all ties: ties count in the model's favour
    # p_y = e^-1e4 underflows in linear space; in log space the plain loss is exact (1e4 / ln 2
    # bits) and the smoothed one is -log2(a / V) up to a negligible correction.
    x = torch.zeros(1, 8)
    x[0, 0] = 1e4
    out = tb.smoothed_nll(x, torch.tensor([3]), (0.0, 0.5))
    assert out.nll_bits[0, 0].item() == pytest.approx(1e4 / math.log(2), rel=1e-6)
    assert out.nll_bits[0, 1].item() == pytest.approx(math.log2(8 / 0.5), rel=1e-6)
    assert out.rank.item() == 1


def test_shapes_ignore_index_and_padding():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 40, generator=g)
    t = torch.randint(0, 33, (2, 5), generator=g)
    t[0, 1] = -1
    out = tb.smoothed_nll(x, t, vocab_size=33, ignore_index=-1)
    assert out.nll_bits.shape == (10, len(tb.DEFAULT_ALPHAS))
    assert not out.valid[1] and out.nll_bits[1].abs().sum() == 0 and out.rank[1] == 0
    ref = tb.smoothed_nll(x[..., :33].contiguous(), t, ignore_index=-1)
    assert torch.allclose(out.logp, ref.logp) and torch.equal(out.rank, ref.rank)
    # a / V uses the true V, not the padded width
    assert torch.allclose(out.nll_bits, ref.nll_bits)
    # non-contiguous rows (a strided view) give the same answer
    big = torch.randn(8, 64, generator=g)
    view = big[::2, :50]
    tt = torch.randint(0, 50, (4,), generator=g)
    assert torch.allclose(tb.smoothed_nll(view, tt).logp, tb.smoothed_nll(view.contiguous(), tt).logp)


def test_empty_input():
    out = tb.smoothed_nll(torch.zeros(0, 100), torch.zeros(0, dtype=torch.long))
    assert out.nll_bits.shape == (0, len(tb.DEFAULT_ALPHAS)) and out.logp.shape == (0,)
    stats = tb.LossStats().update(out)
    assert stats.count == 0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(logits=torch.zeros(2, 5, dtype=torch.float64)), TypeError, "float32, bfloat16 or float16"),
        (dict(targets=torch.zeros(3, dtype=torch.long)), ValueError, "targets.shape"),
        (dict(targets=torch.tensor([0, 7])), ValueError, "vocabulary size is 5"),
        (dict(targets=torch.zeros(2)), TypeError, "integer"),
        (dict(alphas=(0.1, 1.5)), ValueError, r"alpha must lie in \[0, 1\]"),
        (dict(alphas=(-0.1,)), ValueError, "alpha"),
        (dict(vocab_size=6), ValueError, "vocab_size=6"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(logits=torch.zeros(2, 0)), ValueError, "non-empty last"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(kwargs, exc, match):
    args = dict(logits=torch.zeros(2, 5), targets=torch.tensor([0, 4]))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        tb.smoothed_nll(args.pop("logits"), args.pop("targets"), **args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_rows_are_reported(backend):
    x = torch.randn(4, 10)
    x[1, 3] = math.nan
    x[2, :] = -math.inf
    with pytest.raises(ValueError, match="2 rows of logits contain NaN"):
        tb.smoothed_nll(x, torch.tensor([0, 1, 2, 3]), backend=backend)
    # a NaN row that is ignored is not an error
    x[2] = 0.0
    tb.smoothed_nll(x, torch.tensor([0, -100, 2, 3]), backend=backend)


def _op_args(n=5, v=11, d=7, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = torch.randn(v + 2, d, generator=g).to(dtype)
    b = torch.randn(v + 2, generator=g).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[0] = -100
    keep, floor = smoothing_constants(ALPHAS, v)
    return h, w, b, t, keep, floor, v


@pytest.mark.skipif(not has_op("smoothed_nll", "cpu"), reason="extension not built")
def test_ops_trace_under_fake_tensors():
    """Every loss op exists on the CPU build with a fake kernel (torch.compile traces through it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for op in ("smoothed_nll", "linear_smoothed_nll"):
        assert has_op(op, "cpu")
    assert registered_fakes() == {op: True for op in registered_fakes()}
    with FakeTensorMode():
        keep, floor = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        t = torch.zeros(5, dtype=torch.long)
        nll, logp, rank = torch.ops.tokenbounds.smoothed_nll(torch.empty(5, 11), t, keep, floor, 11, -100)
        assert nll.shape == (5, 3) and logp.shape == (5,) and rank.dtype == torch.int32
        nll, logp, rank = torch.ops.tokenbounds.linear_smoothed_nll(
            torch.empty(5, 4), torch.empty(11, 4), None, t, keep, floor, 11, -100, 2**20)
        assert nll.shape == (5, 3) and logp.dtype == torch.float32 and rank.shape == (5,)


@pytest.mark.skipif(not has_op("smoothed_nll", "cpu"), reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    """torch.library.opcheck: schema, fake kernel vs real kernel, AOT dispatch with dynamic shapes."""
    h, w, b, t, keep, floor, v = _op_args(dtype=dtype)
    logits = (h.float() @ w.float().T).to(dtype)
    torch.library.opcheck(torch.ops.tokenbounds.smoothed_nll.default, (logits, t, keep, floor, v, -100))
    for bias in (b, None):
        torch.library.opcheck(torch.ops.tokenbounds.linear_smoothed_nll.default,
                              (h, w, bias, t, keep, floor, v, -100, 2**20))


def test_smoothing_constants_follow_the_header():
    """log(1 - a) and log(a / V), -inf at a = 1 and a = 0: the same on every path."""
    keep, floor = smoothing_constants((0.0, 0.25, 1.0), 1000)
    assert keep.dtype == torch.float64
    assert keep.tolist() == [0.0, math.log1p(-0.25), -math.inf]
    assert floor.tolist() == [-math.inf, math.log(0.25) - math.log(1000), -math.log(1000)]
    ref_keep, ref_floor = reference.smoothing_constants_reference((0.0, 0.25, 1.0), 1000)
    assert torch.equal(keep, ref_keep) and torch.equal(floor, ref_floor)


# ---------------------------------------------------------------- fused linear head
LINEAR_BACKENDS = ["cpu", "reference"] if has_op("linear_smoothed_nll", "cpu") else ["reference"]


@st.composite
def linear_case(draw):
    """(hidden, weight, bias, targets, vocab): shapes around the kernel's blocks (16 tokens,
    48 / 6 vocabulary rows, 256-deep passes), padded vocabularies and adversarial values."""
    n = draw(st.sampled_from([0, 1, 5, 16, 17, 40, 300]))
    d = draw(st.sampled_from([0, 1, 8, 33, 255, 256, 257, 520]))
    v = draw(st.sampled_from([1, 5, 47, 48, 49, 130, 1001]))
    pad = draw(st.sampled_from([0, 7]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    use_bias = draw(st.booleans())
    kind = draw(st.sampled_from(["plain", "plain", "huge", "neginf", "far", "ties", "ignore"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v + pad, d, generator=g) / math.sqrt(max(d, 1))
    b = torch.randn(v + pad, generator=g) if use_bias or kind in ("neginf", "far") else None
    w[v:] = 50.0  # padded vocabulary rows would dominate if they were read
    t = torch.randint(0, v, (n,), generator=g)
    if kind == "huge":  # logits of order 1e3-1e4: peaked rows, p_y may underflow
        w = w * 3e3
    elif kind == "neginf" and n:  # masked vocabulary entries; the first target masked too (p_y = 0)
        b[torch.rand(v + pad, generator=g) < 0.3] = -math.inf
        finite = torch.nonzero(torch.isfinite(b[:v]))[:, 0]
        if finite.numel() == 0:
            b[0] = 0.0
            finite = torch.tensor([0])
        t = finite[torch.randint(0, finite.numel(), (n,), generator=g)]
        t[0] = int(torch.nonzero(torch.isinf(b[:v]))[0, 0]) if bool(torch.isinf(b[:v]).any()) else t[0]
    elif kind == "far" and n:  # the target logit 100 nats below the others: the kernel moves its reference
        b[t] = -100.0
    elif kind == "ties":  # integer-valued logits: exact ties with the target
        h, w = torch.round(h * 2), torch.round(w * 2)
        b = torch.round(b) if b is not None else None
    elif kind == "ignore" and n:
        t[torch.rand(n, generator=g) < 0.4] = -100
    h, w = h.to(dtype), w.to(dtype)
    if dtype == torch.float16:
        h, w = h.clamp(-6e4, 6e4), w.clamp(-6e4, 6e4)
    b = b.to(dtype) if b is not None else None
    return h, w, b, t, v


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@given(case=linear_case(), max_bytes=st.sampled_from([None, 1, 4096, 2**22]))
def test_linear_smoothed_nll_matches_oracle(backend, case, max_bytes):
    h, w, b, t, v = case
    out = tb.linear_smoothed_nll(h, w, t, ALPHAS, bias=b, vocab_size=v, max_bytes=max_bytes, backend=backend)
    assert out.nll_bits.shape == (h.shape[0], len(ALPHAS))
    assert_linear_matches_oracle(out, h, w, b, t, ALPHAS, v)


@pytest.mark.skipif(not has_op("linear_smoothed_nll", "cpu"), reason="extension not built")
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_op_work_split(threads):
    """Token blocks, vocabulary slices (fewer blocks than threads) and small max_bytes give one answer."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, d, v in ((3, 300, 5000), (40, 64, 2000), (600, 32, 777)):
            h, w, b, t, keep, floor, _ = _op_args(n=n, v=v, d=d, seed=n)
            outs = [torch.ops.tokenbounds.linear_smoothed_nll(h, w, b, t, keep, floor, v, -100, mb)
                    for mb in (2**26, 4096, 1)]
            for o in outs:
                assert_linear_matches_oracle(o, h, w, b, t, ALPHAS, v)
            for o in outs[1:]:  # x_t, the ranks and the sums do not depend on the split
                assert torch.equal(o[2], outs[0][2])
                torch.testing.assert_close(o[1], outs[0][1], rtol=1e-6, atol=1e-6)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_linear_far_and_masked_targets(backend):
    """Target logits far below the others (the CPU kernel moves its exp reference) and masked
    targets (bias -inf: p_y = 0, finite smoothed loss), next to ordinary rows."""
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(37, 40, generator=g), torch.randn(500, 40, generator=g) / 6
    b = torch.zeros(500)
    t = torch.randint(0, 500, (37,), generator=g)
    b[t[:10]] = -200.0  # p_y ~ e^-200
    b[t[10:15]] = -math.inf
    b[t[15:18]] = 300.0  # dominant targets
    out = tb.linear_smoothed_nll(h, w, t, ALPHAS, bias=b, backend=backend)
    assert torch.isneginf(out.logp[10:15]).all() and torch.isfinite(out.nll_bits[10:15, 1:]).all()
    assert (out.logp[:10] < -150).all()
    assert_linear_matches_oracle(out, h, w, b, t, ALPHAS, 500)


def test_linear_oracle_check_can_fail():
    """Negative control: the oracle check rejects a log p off by 1e-3 nats and a rank off by one."""
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(8, 16, generator=g), torch.randn(300, 16, generator=g) / 4
    t = torch.randint(0, 300, (8,), generator=g)
    out = tb.linear_smoothed_nll(h, w, t, ALPHAS)
    assert_linear_matches_oracle(out, h, w, None, t, ALPHAS, 300)
    for field, delta in (("logp", 1e-3), ("rank", 1)):
        bad = dataclasses.replace(out, **{field: getattr(out, field) + delta})
        with pytest.raises(AssertionError):
            assert_linear_matches_oracle(bad, h, w, None, t, ALPHAS, 300)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_linear_smoothed_nll_benchmark_shape(backend):
    """Real vocabulary and depth (V = 32000, D = 1024) on a few hundred tokens."""
    g = torch.Generator().manual_seed(3)
    n = 40 if backend == "reference" else 120
    h = torch.randn(n, 1024, generator=g) / 32
    w = torch.randn(32000, 1024, generator=g)
    t = torch.randint(0, 32000, (n,), generator=g)
    out = tb.linear_smoothed_nll(h, w, t, ALPHAS, backend=backend)
    assert_linear_matches_oracle(out, h, w, None, t, ALPHAS, 32000)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_linear_bad_values_are_reported(backend):
    h = torch.randn(5, 8)
    w = torch.randn(20, 8)
    b = torch.zeros(20)
    t = torch.tensor([0, 1, 2, 3, -100])
    h[1, 2] = math.nan  # NaN logits in row 1
    b[7] = math.inf  # a +inf logit in every row
    with pytest.raises(ValueError, match="4 rows of hidden @ weight.T contain NaN"):
        tb.linear_smoothed_nll(h, w, t, bias=b, backend=backend)
    b[7] = 0.0
    with pytest.raises(ValueError, match="1 rows of hidden @ weight.T contain NaN"):
        tb.linear_smoothed_nll(h, w, t, bias=b, backend=backend)
    # every logit -inf: no distribution at all
    with pytest.raises(ValueError, match="4 rows"):
        tb.linear_smoothed_nll(torch.randn(5, 8), w, t, bias=torch.full((20,), -math.inf), backend=backend)
    # an ignored NaN row is not an error
    t[1] = -100
    out = tb.linear_smoothed_nll(h, w, t, bias=b, backend=backend)
    assert out.logp[1] == 0 and out.rank[1] == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_smoothed_nll_matches_materialised_logits(backend):
    """The fused head equals smoothed_nll of the logits it never stores (within GEMM rounding)."""
    g = torch.Generator().manual_seed(4)
    h, w, b = torch.randn(2, 30, 64, generator=g), torch.randn(1000, 64, generator=g) / 8, torch.randn(1000, generator=g)
    t = torch.randint(0, 990, (2, 30), generator=g)
    fused = tb.linear_smoothed_nll(h, w, t, ALPHAS, bias=b, vocab_size=990, backend=backend)
    plain = tb.smoothed_nll(h @ w.T + b, t, ALPHAS, vocab_size=990, backend=backend)
    torch.testing.assert_close(fused.logp, plain.logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.nll_bits, plain.nll_bits, rtol=1e-5, atol=1e-5)
    assert (fused.rank - plain.rank).abs().max() <= 1


def test_linear_smoothed_nll_bad_input():
    h, w, t = torch.zeros(3, 4), torch.zeros(10, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="weight must have shape"):
        tb.linear_smoothed_nll(h, torch.zeros(10, 5), t)
    with pytest.raises(TypeError, match="dtype"):
        tb.linear_smoothed_nll(h, w.half(), t)
    with pytest.raises(ValueError, match="max_bytes"):
        tb.linear_smoothed_nll(h, w, t, max_bytes=0)
    with pytest.raises(ValueError, match="bias"):
        tb.linear_smoothed_nll(h, w, t, bias=torch.zeros(3))


# ---------------------------------------------------------------- LossStats
def _random_losses(n, seed, alphas=tb.DEFAULT_ALPHAS, v=300):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 2
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.1] = -100
    return tb.smoothed_nll(x, t, alphas)


def test_loss_stats_merge_equals_whole():
    a, b = _random_losses(700, 1), _random_losses(500, 2)
    whole = tb.LossStats().update(a).update(b)
    left, right = tb.LossStats().update(a), tb.LossStats().update(b)
    merged = left.merge(right)
    assert merged.count == whole.count
    for name in ("mean", "m2", "m3", "m4", "min_bits", "max_bits"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-12, atol=1e-9)
    assert merged.topk_correct == whole.topk_correct
    # against a direct float64 computation over all valid tokens
    nll = torch.cat([a.nll_bits[a.valid], b.nll_bits[b.valid]]).double().numpy()
    np.testing.assert_allclose(merged.mean, nll.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.m2, ((nll - nll.mean(0)) ** 2).sum(0), rtol=1e-10)
    np.testing.assert_allclose(merged.m4, ((nll - nll.mean(0)) ** 4).sum(0), rtol=1e-10)
    np.testing.assert_allclose(merged.sum_sq_about(3.0), ((nll - 3.0) ** 2).sum(0), rtol=1e-10)
    np.testing.assert_allclose(merged.sum_pow4_about(3.0), ((nll - 3.0) ** 4).sum(0), rtol=1e-10)
    rank = torch.cat([a.rank[a.valid], b.rank[b.valid]])
    assert merged.topk_correct[1] == int((rank < 1).sum())
    assert merged.topk_error(5) == pytest.approx(1 - float((rank < 5).float().mean()))


def test_loss_stats_state_dict_round_trip_is_exact():
    s = tb.LossStats().update(_random_losses(300, 3))
    again = tb.LossStats.from_json(s.to_json())
    assert again.state_dict() == s.state_dict()
    with pytest.raises(ValueError, match="alphas"):
        tb.LossStats(alphas=(0.1,)).update(_random_losses(10, 4))
    with pytest.raises(ValueError, match="format"):
        tb.LossStats.from_state_dict({"format": "other"})
