"""UnitStats: the per-draw power sums of window-unit (cluster) sampling (spec section 3b)."""

from __future__ import annotations

import numpy as np
import pytest
import tokenbounds as tb
import torch
from tokenbounds.losses import TOPK, UnitStats


def _losses(n, seed, v=200):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 2
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.05] = -100
    return tb.smoothed_nll(x, t)


def _direct(losses, unit_index, weights):
    """Float64 per-draw unit means, expanded by multiplicity."""
    valid = losses.valid.numpy()
    nll = losses.nll_bits.double().numpy()[valid]
    idx = unit_index[valid]
    ys, qs, errs = [], [], []
    for u, w in enumerate(weights):
        rows = idx == u
        y = nll[rows].mean(0)
        q = (nll[rows] ** 2).mean(0)
        e1 = 1.0 - (losses.rank.numpy()[valid][rows] < 1).mean()
        ys += [y] * int(w)
        qs += [q] * int(w)
        errs += [e1] * int(w)
    return np.array(ys), np.array(qs), np.array(errs)


def test_unit_stats_match_a_direct_computation():
    losses = _losses(600, 1)
    rng = np.random.default_rng(0)
    unit_index = np.sort(rng.integers(0, 25, 600))
    unit_index = np.unique(unit_index, return_inverse=True)[1]
    u = unit_index.max() + 1
    weights = rng.integers(1, 4, u)
    st = tb.UnitStats().update(losses, unit_index, weights)
    y, q, e = _direct(losses, unit_index, weights)
    assert st.draws == weights.sum()
    np.testing.assert_allclose(list(st.mean_bits.values()), y.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.variance_bits, y.var(0, ddof=1), rtol=1e-9)
    assert st.topk_error(1) == pytest.approx(e.mean(), rel=1e-12)
    assert st.topk_error_variance(1) == pytest.approx(e.var(ddof=1), rel=1e-9)
    for c in (0.0, 3.0, np.linspace(1, 8, len(st.alphas))):
        w = q - 2 * np.asarray(c) * y + np.asarray(c) ** 2
        mean, var = st.sq_about(c)
        np.testing.assert_allclose(mean, w.mean(0), rtol=1e-10)
        np.testing.assert_allclose(var, w.var(0, ddof=1), rtol=1e-7)


def test_unit_stats_merge_equals_whole_and_round_trips():
    a, b = _losses(300, 2), _losses(200, 3)
    ia, ib = np.repeat(np.arange(10), 30), np.repeat(np.arange(8), 25)
    whole = tb.UnitStats().update(a, ia).update(b, ib)
    merged = tb.UnitStats().update(a, ia).merge(tb.UnitStats().update(b, ib))
    assert merged.state_dict() == whole.state_dict()
    again = tb.UnitStats.from_json(whole.to_json())
    assert again.state_dict() == whole.state_dict()
    assert set(again.topk_err_sum) == set(TOPK)


def test_unit_stats_bad_input():
    losses = _losses(10, 4)
    with pytest.raises(ValueError, match="unit_index has"):
        tb.UnitStats().update(losses, np.zeros(9, dtype=np.int64))
    with pytest.raises(ValueError, match="at least one scored token"):
        tb.UnitStats().update(losses, np.zeros(10, dtype=np.int64), weights=[1, 1])
    with pytest.raises(ValueError, match="alphas"):
        tb.UnitStats(alphas=(0.1,)).update(losses, np.zeros(10, dtype=np.int64))
    with pytest.raises(ValueError, match="not a UnitStats"):
        tb.UnitStats.from_state_dict({"format": "x"})


def test_unit_means_are_unbiased_for_the_token_average():
    """Spec 3b: a draw picks one of the m positions uniformly, so unit u is drawn with
    probability n_u / m and E[mean of the drawn unit means] = Rhat_m, for units of any sizes.
    Negative control: drawing units uniformly (ignoring their sizes) is biased, and the same
    check must see it."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 60, 80)
    m = int(sizes.sum())
    losses = [rng.gamma(2.0, 1.0 + n / 20, n) for n in sizes]  # bigger units have larger losses
    rhat = np.concatenate(losses).mean()
    sums = np.array([[x.sum()] for x in losses])
    sq = np.array([[(x * x).sum()] for x in losses])
    unit_of = np.repeat(np.arange(sizes.size), sizes)
    reps, draws = 3000, 20
    est, uniform = np.empty(reps), np.empty(reps)
    for i in range(reps):
        w = np.bincount(unit_of[rng.integers(0, m, draws)], minlength=sizes.size)
        st = UnitStats(alphas=(0.5,)).update_units(sizes, sums, sq, sums[:, 0], np.zeros((sizes.size, len(TOPK))), w)
        est[i] = st.mean_bits[0.5]
        assert st.draws == draws and st.tokens == int((w * sizes).sum())
        uniform[i] = (sums[:, 0] / sizes)[rng.integers(0, sizes.size, draws)].mean()
    se = est.std(ddof=1) / np.sqrt(reps)
    print(f"Rhat_m {rhat:.4f}; size-biased draws {est.mean():.4f} +- {se:.4f}; "
          f"uniform over units {uniform.mean():.4f}")
    assert abs(est.mean() - rhat) < 4 * se
    assert abs(uniform.mean() - rhat) > 10 * se  # the harness sees a biased design
