"""The window engine (tokenbounds.eval.sample / score): which positions each window scores, the
losses against an independent float64 reference of the same context rule, the prefix token,
end-of-text resets, and unit sampling (spec/bounds.md section 3b)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenbounds.eval.data import TokenStreams
from tokenbounds.eval.hf import FusedHead
from tokenbounds.eval.sample import ContextRule, Units, plan_units, rows_for_units
from tokenbounds.eval.score import Scorer
from tokenbounds.models.gpt import GPT, GPTConfig

ALPHAS = (1e-3, 0.1, 0.5)
V = 61


def _streams(lengths, *, seed=0, eot=0, doc_every=7):
    rng = np.random.default_rng(seed)
    files = []
    for n in lengths:
        x = rng.integers(1, V, size=n).astype(np.uint16)
        x[::doc_every] = eot
        x[rng.random(n) < 0.05] = eot  # irregular documents too
        files.append(x)
    return TokenStreams(files, eot_id=eot)


def _all_targets(streams, rule):
    units = Units(streams, rule.stride)
    rows = rows_for_units(units, rule, np.arange(units.num_units))
    n = rows.last - rows.first + 1
    row = np.repeat(np.arange(n.size), n)
    off = np.concatenate([[0], np.cumsum(n)[:-1]])
    k = rows.first[row] + np.arange(n.sum()) - off[row]
    return units, rows, row, k


RULES = [("windows", 8, 4), ("windows", 8, 8), ("windows", 8, 1), ("windows", 7, 3), ("windows", 5, 5),
         ("per-token", 6, 1)]


@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.parametrize("mode,T,S", RULES)
def test_full_pass_scores_every_data_point_exactly_once(mode, T, S, reset):
    streams = _streams([2, 3, 9, 40, 101])
    rule = ContextRule(mode, T, S, None, reset, 0)
    units, rows, row, k = _all_targets(streams, rule)
    f = rows.file[row]
    seen = np.zeros((len(streams.files), int(streams.sizes.max())), dtype=np.int64)
    np.add.at(seen, (f, k), 1)
    for i, n in enumerate(streams.sizes):
        assert seen[i, 0] == 0 and (seen[i, 1:n] == 1).all() and (seen[i, n:] == 0).all()
    assert seen.sum() == streams.num_points == int(sum(streams.sizes - 1))
    # each target's predecessor lies inside its row, rows read at most T tokens
    assert ((k - 1 >= rows.start[row]) & (k - 1 < rows.end[row])).all()
    assert (rows.end - rows.start <= T).all()
    # the plan of a full pass has every unit once, weight 1
    plan = plan_units(units, rule, sample_tokens=None, seed=0)
    assert sorted(plan.units.tolist()) == list(range(units.num_units)) and (plan.weights == 1).all()
    assert plan.scored_tokens == plan.weighted_tokens == streams.num_points


def _reference_start(x, k, rule):
    """The context rule restated per target: the first data token of target k's context."""
    if rule.mode == "windows":
        u = (k - 1) // rule.stride
        last = min((u + 1) * rule.stride, len(x) - 1)
        start = max(0, last - rule.window)
    else:
        start = max(0, k - rule.window)
    if rule.reset_at_eot:
        eots = [e for e in range(k) if x[e] == rule.eot_id]
        if eots:
            start = max(start, eots[-1])
    return start


@pytest.mark.parametrize("mode,T,S", RULES)
@pytest.mark.parametrize("reset", [False, True])
def test_context_of_each_target_follows_the_rule(mode, T, S, reset):
    streams = _streams([23, 57], seed=3)
    rule = ContextRule(mode, T, S, None, reset, 0)
    _, rows, row, k = _all_targets(streams, rule)
    for i in range(k.size):
        x = streams.files[int(rows.file[row[i]])]
        assert rows.start[row[i]] == _reference_start(x, int(k[i]), rule), (i, int(k[i]))


def test_windows_match_lm_evaluation_harness_rolling_windows():
    """lm-eval's get_rolling_token_windows over x_1.. (prefix x_0, max_seq_len T, context_len
    T - S + 1) gives every target the same context as our units when S divides T."""
    utils = pytest.importorskip("lm_eval.utils", reason="lm-eval not installed (pip install --no-deps lm-eval ...)")
    for n, T, S in [(50, 8, 4), (37, 8, 2), (64, 6, 3), (29, 8, 8), (9, 8, 4), (100, 16, 16)]:
        theirs = {}
        for inp, pred in utils.get_rolling_token_windows(list(range(1, n)), 0, T, T - S + 1):
            assert len(inp) <= T
            for k in pred:  # token ids are positions: the window's first token is the context start
                assert k not in theirs
                theirs[k] = inp[0]
        streams = TokenStreams([np.arange(n, dtype=np.uint16)])
        rule = ContextRule("windows", T, S)
        _, rows, row, k = _all_targets(streams, rule)
        ours = dict(zip(k.tolist(), rows.start[row].tolist(), strict=True))
        assert ours == theirs, (n, T, S)


def _gpt(seed=0, ctx=16):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, context_length=ctx, n_layer=2, n_head=2, d_model=16)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # far from uniform predictions
    return model


def _reference_losses(model, x, k, start, prefix, alphas):
    """float64: run the model on [prefix] + x[start:k] and score x[k] from its last position."""
    ctx = ([prefix] if prefix is not None else []) + [int(t) for t in x[start:k]]
    with torch.no_grad():
        logits = model.double()(torch.tensor([ctx]))[0, -1]
    logp = torch.log_softmax(logits, -1)
    y = int(x[k])
    p = float(logp[y].exp())
    nll = [-math.log2((1 - a) * p + a / V) for a in alphas]
    rank = int((logits > logits[y]).sum())
    return nll, float(logp[y]), rank


@pytest.mark.parametrize("mode,T,S,reset,prefix", [("windows", 8, 4, False, None), ("windows", 7, 3, True, None),
                                                   ("windows", 6, 6, False, 60), ("per-token", 5, 1, True, 60),
                                                   ("windows", 15, 5, True, 60)])
def test_window_losses_equal_a_float64_reference(mode, T, S, reset, prefix):
    model = _gpt()
    ref_model = _gpt()
    streams = _streams([45, 30], seed=1)
    rule = ContextRule(mode, T, S, prefix, reset, 0)
    units = Units(streams, rule.stride)
    scorer = Scorer(FusedHead(model), streams, units, rule, ALPHAS)
    plan = plan_units(units, rule, sample_tokens=None, seed=0)
    got = {}
    for i in range(0, plan.units.size, 5):
        tg, losses = scorer.batch_losses(plan.units[i : i + 5])
        for j in range(tg["token"].size):
            got[(int(tg["file"][j]), int(tg["position"][j]))] = (losses.nll_bits[j], losses.logp[j], losses.rank[j],
                                                                 int(tg["context"][j]))
    assert len(got) == streams.num_points
    ranks_equal = 0
    for (f, k), (nll, logp, rank, ctx) in got.items():
        x = streams.files[f]
        start = _reference_start(x, k, rule)
        assert ctx == k - start
        r_nll, r_logp, r_rank = _reference_losses(ref_model, x, k, start, prefix, ALPHAS)
        np.testing.assert_allclose(nll, r_nll, rtol=1e-4, atol=1e-4)
        assert abs(logp - r_logp) < 1e-4
        ranks_equal += int(rank == r_rank)
    assert ranks_equal >= 0.98 * len(got)


def test_prefix_token_is_prepended_to_every_window():
    streams = _streams([40])
    rule = ContextRule("windows", 8, 4, 60)
    units = Units(streams, 4)
    scorer = Scorer(FusedHead(_gpt()), streams, units, rule, ALPHAS)
    rows = rows_for_units(units, rule, np.arange(units.num_units))
    inp = scorer.inputs(rows)
    assert (inp[:, 0] == 60).all() and inp.shape[1] == 9
    for r in range(inp.shape[0]):
        n = rows.end[r] - rows.start[r]
        assert inp[r, 1 : 1 + n].tolist() == streams.files[0][rows.start[r] : rows.end[r]].tolist()
    with pytest.raises(ValueError, match="exceeds the model's context of 8"):
        rule.check_model_context(8)
    ContextRule("windows", 8, 4).check_model_context(8)


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="--stride must lie in"):
        ContextRule("windows", 8, 9)
    with pytest.raises(ValueError, match="--stride must lie in"):
        ContextRule("windows", 8, 0)
    with pytest.raises(ValueError, match="--window must be >= 1"):
        ContextRule("windows", 0, 1)
    with pytest.raises(ValueError, match="end-of-text"):
        ContextRule("windows", 8, 4, reset_at_eot=True)


def test_unit_sampling_is_unbiased_and_uniform_units_are_not():
    """Y = the mean loss of the unit of a uniform data point has mean Rhat_m (the m-token
    average); drawing *units* uniformly (the negative control) is biased when units differ in
    size."""
    streams = _streams([3, 4, 5, 90, 130, 6, 2], seed=5)
    units = Units(streams, 8)
    rng = np.random.default_rng(0)
    size = units.sizes(np.arange(units.num_units)).astype(float)
    # per-target losses: short units (file ends) lose much more, as first tokens of a file do
    y = np.where(size < 8, 6.0, 1.0) + rng.random(units.num_units)
    rhat = float((size * y).sum() / size.sum())
    exact = float((size / size.sum() * y).sum())  # E[Y] = sum_u (n_u / m) y_u
    assert exact == pytest.approx(rhat, rel=1e-12)
    reps, s = 4000, 50
    means = np.empty(reps)
    uniform = np.empty(reps)
    for r in range(reps):
        plan = plan_units(units, ContextRule("windows", 8, 8), sample_tokens=s, seed=r)
        assert plan.weights.sum() == s
        means[r] = (y[plan.units] * plan.weights).sum() / s
        uniform[r] = y[rng.integers(0, units.num_units, s)].mean()
    se = means.std() / math.sqrt(reps)
    assert abs(means.mean() - rhat) < 4 * se
    assert abs(uniform.mean() - rhat) > 10 * uniform.std() / math.sqrt(reps)


def test_unit_plan_weights_count_repeated_draws():
    streams = _streams([30])
    units = Units(streams, 10)  # 3 units
    rule = ContextRule("windows", 10, 10)
    plan = plan_units(units, rule, sample_tokens=200, seed=1)
    assert plan.weights.sum() == 200 and plan.units.size == 3 and plan.draws == 200
    pts = np.random.default_rng(1).integers(0, streams.num_points, 200)
    counts = np.bincount(units.of_points(pts), minlength=3)
    assert dict(zip(plan.units.tolist(), plan.weights.tolist(), strict=True)) == dict(enumerate(counts.tolist()))
    assert plan.weighted_tokens == int((units.sizes(plan.units) * plan.weights).sum())
