"""Blocked LDLQ (two-level lazy updates, float32 work) against the column-by-column float64 oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenbounds.quant import codebooks as cb
from tokenbounds.quant.ldlq import (
    cholesky_upper,
    damped_hessian,
    feedback_matrix,
    inverse_cholesky_upper,
    ldlq,
    ldlq_reference,
    rtn,
)


def _layer(out: int, n: int, seed: int = 0):
    """Correlated inputs with a few outlier channels (the regime where error feedback matters)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5 + torch.eye(n, dtype=torch.float64)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64) @ a
    x[:, : max(1, n // 32)] *= 10
    h = x.T @ x / x.shape[0]
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    hd, _ = damped_hessian(h, 0.01)
    return w, h, inverse_cholesky_upper(hd, 0.01), cholesky_upper(hd, 0.01)


def _uniform(w: torch.Tensor, bits: int):
    s = w.abs().amax(1, keepdim=True) / (2**bits - 1)

    def quantizer(cols, first):
        return cb.uniform_quantize(cols, s, bits)

    return quantizer


def _e8(w: torch.Tensor):
    s = w.pow(2).mean(1, keepdim=True).sqrt() * 0.8

    def quantizer(cols, first):
        pts = cb.e8_nearest((cols / s).reshape(-1, 8)).reshape(cols.shape)
        return pts * s, torch.round(pts * 2).to(torch.int64)

    return quantizer


def _loss(w, v, h) -> float:
    d = v - w
    return float(torch.einsum("ij,jk,ik->", d, h, d) / torch.einsum("ij,jk,ik->", w, h, w))


@pytest.mark.parametrize("codebook, group", [("uniform", 1), ("e8", 8)])
@pytest.mark.parametrize("block_size, inner", [(128, 16), (64, 24), (40, 40), (8, 8)])
def test_blocked_matches_unblocked_float64(codebook, group, block_size, inner):
    w, h, u, m = _layer(24, 200)
    q = _uniform(w, 2) if codebook == "uniform" else _e8(w)
    v_ref, c_ref = ldlq_reference(w, u, q, group=group)
    v, c = ldlq(w, m, q, group=group, block_size=block_size, inner=inner, dtype=torch.float64)
    assert c.dtype == torch.int64 and c.shape == w.shape and c.is_contiguous()
    torch.testing.assert_close(c, c_ref, rtol=0, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("codebook, group", [("uniform", 1), ("e8", 8)])
def test_float32_work_gives_the_same_codes_up_to_ties(codebook, group):
    w, h, u, m = _layer(64, 256, seed=1)
    q = _uniform(w, 3) if codebook == "uniform" else _e8(w)
    v_ref, c_ref = ldlq_reference(w, u, q, group=group)
    v, c = ldlq(w, m, q, group=group)  # float32 default
    # a float32 rounding can flip a code at a tie; the flip then steers the rest of that row
    assert float((c != c_ref).double().mean()) <= 2e-3
    assert _loss(w, v, h) == pytest.approx(_loss(w, v_ref, h), rel=1e-3)


@settings(max_examples=12, deadline=None)
@given(
    out=st.integers(1, 9),
    n_groups=st.integers(1, 24),
    group=st.sampled_from([1, 8]),
    block_size=st.integers(1, 70),
    inner=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_property_blocking_never_changes_codes(out, n_groups, group, block_size, inner, seed):
    n = n_groups * group
    w, _, u, m = _layer(out, n, seed)
    q = _uniform(w, 2) if group == 1 else _e8(w)
    _, c_ref = ldlq_reference(w, u, q, group=group)
    _, c = ldlq(w, m, q, group=group, block_size=block_size, inner=inner, dtype=torch.float64)
    assert torch.equal(c, c_ref)


def test_ldlq_beats_rtn_and_feedback_is_exact_on_a_diagonal_hessian():
    w, h, _, m = _layer(32, 128, seed=2)
    q = _uniform(w, 2)
    v_ldlq, _ = ldlq(w, m, q)
    v_rtn, _ = rtn(w, q)
    assert _loss(w, v_ldlq, h) < 0.8 * _loss(w, v_rtn, h)
    # with H diagonal there is nothing to feed back: LDLQ is RTN
    hd = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5)
    _, c_diag = ldlq(w, cholesky_upper(hd, 0.01), q)
    assert torch.equal(c_diag, rtn(w, q)[1])


def test_inverse_cholesky_upper_is_the_cholesky_factor_of_the_inverse():
    _, h, _, _ = _layer(1, 96, seed=3)
    hd, _ = damped_hessian(h, 0.01)
    u = inverse_cholesky_upper(hd, 0.01)
    assert torch.equal(u, u.triu()) and bool((torch.diagonal(u) > 0).all())
    hinv = torch.linalg.inv(hd)
    torch.testing.assert_close(u.T @ u, hinv, rtol=1e-10, atol=1e-12 * float(hinv.abs().max()))
    u_slow = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    torch.testing.assert_close(u, u_slow, rtol=1e-10, atol=1e-12)


def test_inverse_cholesky_retries_with_more_damping():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = x.T @ x  # rank 4: the Cholesky of H itself fails
    assert int(torch.linalg.cholesky_ex(h)[1]) != 0
    u = inverse_cholesky_upper(h, 0.01)
    assert bool(torch.isfinite(u).all()) and torch.equal(u, u.triu())
    with pytest.raises(RuntimeError, match="Cholesky"):
        inverse_cholesky_upper(torch.full((4, 4), float("nan"), dtype=torch.float64), 0.01)


def test_threads_are_restored_and_arguments_checked():
    w, _, u, m = _layer(4, 16)
    before = torch.get_num_threads()

    def broken(cols, first):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        ldlq(w, m, broken)
    assert torch.get_num_threads() == before
    ldlq(w, m, _uniform(w, 2))
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="multiple of the codebook dimension 8"):
        ldlq(w[:, :12], m[:12, :12], _e8(w), group=8)
    with pytest.raises(ValueError, match="m must be"):
        ldlq(w, m[:8, :8], _uniform(w, 2))
    with pytest.raises(ValueError, match="u must be"):
        ldlq_reference(w, u[:8, :8], _uniform(w, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_upper_and_feedback_matrix(dtype):
    """H + lambda I = M M^T with M upper; U = M^-1; B_<g,g = M_<g,g M_gg^-1 with zero diagonal blocks."""
    _, h, _, _ = _layer(1, 64, seed=4)
    hd, _ = damped_hessian(h, 0.01)
    m = cholesky_upper(hd, 0.01, dtype=dtype)
    assert m.dtype == dtype and torch.equal(m, m.triu()) and bool((torch.diagonal(m) > 0).all())
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close((m.double() @ m.double().T), hd, rtol=tol, atol=tol * float(hd.abs().max()))
    m64 = cholesky_upper(hd, 0.01)
    torch.testing.assert_close(inverse_cholesky_upper(hd, 0.01) @ m64, torch.eye(64, dtype=torch.float64),
                               rtol=0, atol=1e-10)
    for group in (1, 8):
        b = feedback_matrix(m64, group)
        blk = torch.arange(64) // group
        assert bool((b[blk[:, None] >= blk[None, :]] == 0).all())
        for g0 in range(0, 64, group):
            sl = slice(g0, g0 + group)
            want = m64[:g0, sl] @ torch.linalg.inv(m64[sl, sl])
            torch.testing.assert_close(b[:g0, sl], want, rtol=1e-10, atol=1e-12)
