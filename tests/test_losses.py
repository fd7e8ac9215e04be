"""smoothed_nll / linear_smoothed_nll on every CPU backend against the float64 oracle."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tokenbounds as tb
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenbounds.ops._dispatch import has_op
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


def test_torch_compile_traces_the_custom_op():
    if not has_op("smoothed_nll", "cpu"):
        pytest.skip("extension not built")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 11)
        t = torch.zeros(5, dtype=torch.long)
        nll, logp, rank = torch.ops.tokenbounds.smoothed_nll(x, t, torch.zeros(3, dtype=torch.float64), 11, -100)
    assert nll.shape == (5, 3) and logp.shape == (5,) and rank.dtype == torch.int32


# ---------------------------------------------------------------- fused linear head
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(
    n=st.integers(0, 50),
    d=st.sampled_from([1, 8, 33]),
    v=st.sampled_from([1, 5, 130, 1001]),
    pad=st.sampled_from([0, 7]),
    use_bias=st.booleans(),
    max_bytes=st.sampled_from([None, 1, 4096]),
    seed=st.integers(0, 1000),
)
def test_linear_smoothed_nll_matches_materialised_logits(backend, n, d, v, pad, use_bias, max_bytes, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v + pad, d, generator=g)
    b = torch.randn(v + pad, generator=g) if use_bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if n > 2:
        t[1] = -100
    out = tb.linear_smoothed_nll(h, w, t, ALPHAS, bias=b, vocab_size=v, max_bytes=max_bytes, backend=backend)
    logits = h @ w.t() + (b if b is not None else 0)
    assert_close_to_oracle(out, logits, t, v)


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
