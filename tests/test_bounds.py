"""Unit tests of tokenbounds.bounds: the worked examples of spec/bounds.md (to 1e-9 relative),
the entropy coder round trip, validation, from_stats, the CLI and the helpers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenbounds import bounds as B
from tokenbounds.losses import DEFAULT_ALPHAS, LossStats

REPO = Path(__file__).resolve().parents[1]
REL = 1e-9
M_EX, S_EX, C_EX, V_EX = 8_009_762, 10_000, 100_000, 50257


def close(a: float, b: float, rel: float = REL) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


# ------------------------------------------------------------------ worked examples (spec)


def test_loss_range_examples():
    assert close(round(B.loss_range_bits(1e-4, V_EX), 6), 28.904605)
    assert abs(B.loss_range_bits(1e-4, V_EX) - 28.904605) < 5e-7
    assert abs(B.loss_range_bits(0.01, V_EX) - 22.246394) < 5e-7
    assert abs(B.loss_range_bits(0.5, V_EX) - 15.617066) < 5e-7
    a, v = 0.05, 1000
    assert close(B.max_loss_bits(a, v) - B.min_loss_bits(a, v), B.loss_range_bits(a, v))


def test_message_length_lotfi_example():
    # 50000 symbols over 11 levels as equiprobable as 50000 allows: 172973 + 176 + 176 bits.
    x = np.random.default_rng(0).permutation(np.arange(50_000) % 11)
    ml = B.message_length_bits(x, mode="lotfi-code")
    assert ml.payload_bits == 172_973
    assert ml.side["codebook_bits"] == 176 and ml.side["counts_bits"] == 176
    assert ml.total_bits == 173_325
    assert close(B.prefix_free_bits(173_325), 173_359.806240, rel=1e-11)
    assert ml.mode == "lotfi-code" and ml.num_symbols == 50_000 and ml.num_levels == 11


def test_prefix_free_and_prior():
    assert B.prefix_free_bits(0) == 0.0
    assert close(B.prefix_free_bits(1024), 1024 + 20)
    assert close(B.log_prior_nats(1024, 4), (1024 + 20 + 4) * math.log(2))
    assert B.prefix_free_bits(0.5) == 0.5  # the 2 log2 C correction is never negative


def test_token_bound_lotfi_example():
    emp = {a: 5.0 for a in DEFAULT_ALPHAS}
    tb = B.token_bound(emp, coded_bits=C_EX, train_tokens=M_EX, sample_tokens=S_EX,
                       vocab_size=V_EX, delta=0.05, extra_bits=7, alpha_cost="lotfi-code")
    by_alpha = {c["alpha"]: c for c in tb.candidates}
    assert by_alpha[1e-4]["index"] == 1 and by_alpha[0.5]["index"] == 8
    assert close(by_alpha[1e-4]["bound_bits"], 7.255739451668852)
    assert close(by_alpha[0.5]["bound_bits"], 6.219056317674783)
    assert round(by_alpha[1e-4]["bound_bits"], 6) == 7.255739
    assert round(by_alpha[0.5]["bound_bits"], 6) == 6.219056
    assert tb.alpha == 0.5 and close(tb.bound_bits, 6.219056317674783)
    assert close(tb.bound_bits, tb.empirical_bits + tb.complexity_bits + tb.sampling_bits)
    assert not tb.vacuous and tb.uniform_bits == math.log2(V_EX)
    d = tb.to_dict()
    json.dumps(d)
    assert d["alpha_cost"] == "lotfi-code" and len(d["candidates"]) == 8


def test_token_bound_union_pays_delta_over_grid():
    emp = {a: 5.0 for a in DEFAULT_ALPHAS}
    kw = dict(coded_bits=C_EX, train_tokens=M_EX, sample_tokens=S_EX, vocab_size=V_EX, extra_bits=7)
    union = B.token_bound(emp, **kw)
    single = B.token_bound(5.0, alpha=0.5, **kw, delta=0.05 / 8)
    assert close(union.bound_bits, single.bound_bits)
    assert union.chosen_among == 8 and "delta/8" in union.choice_cost
    # each candidate alone at the full delta is reported, and is tighter than the paid one
    for c in union.candidates:
        assert c["bound_bits_alone_full_delta"] < c["bound_bits"]


def test_topk_example():
    b = B.topk_bound(0.70, coded_bits=C_EX, train_tokens=M_EX, sample_tokens=S_EX, extra_bits=7)
    assert close(b.bound, 0.778038202, rel=1e-9)
    assert b.loss_range == 1.0 and close(b.bound, b.empirical + b.complexity + b.sampling)


def test_freedman_test_vector():
    gap, lam = B.freedman_gap(1e7, 1e10, 0.0225, 10.0, 0.05)
    assert lam == 0.25
    assert close(gap, 0.0739138935, rel=1e-9)
    cc = (1e7 + math.log(59 / 0.05)) / 1e10
    assert close(cc, 0.001000000707, rel=1e-9)
    # small-Cc behaviour: sigma sqrt(2 Cc) + (2/3) Delta Cc is close to the grid minimum
    approx = 1.5 * math.sqrt(2 * cc) + 2 / 3 * 10 * cc
    assert abs(gap - approx) / approx < 0.05


def test_lambda_grid():
    g = B.LAMBDA_GRID
    assert g.size == 59 and g.min() == 2.0**-30 and g.max() == 1 - 2.0**-30
    assert np.all(np.diff(g) > 0)
    # large Cc / S pushes the optimum towards 1
    _, lam = B.freedman_gap(1e6, 1e6, 1e-6, 1.0)
    assert lam > 0.99


def test_freedman_variance_beats_range():
    emp = {a: 5.0 for a in DEFAULT_ALPHAS}
    var = {a: 4.0 for a in DEFAULT_ALPHAS}
    kw = dict(coded_bits=5e7, train_tokens=9e9, sample_tokens=1e6, vocab_size=V_EX)
    tb = B.token_bound(emp, **kw)
    fb = B.freedman_bound(emp, variance_bits=var, **kw)
    assert fb.bound_bits < tb.bound_bits
    assert close(fb.bound_bits, fb.empirical_bits + fb.sampling_bits + fb.gap_bits)
    assert close(fb.gap_bits, fb.complexity_bits + fb.variance_bits)
    s = sum(fb.delta_split.values())
    assert close(s, 0.05 / 8)
    json.dumps(fb.to_dict())


def test_freedman_full_pass_matches_gap():
    # no subsampling, a constant centering: the bound is Rhat + freedman_gap with the
    # exact S (its lambda grid union matches) -- checks the plumbing against the primitive.
    a, v, n = 0.1, 1000, 50_000
    lo, rng = B.min_loss_bits(a, v), B.loss_range_bits(a, v)
    mean, var, c = 4.0, 2.5, 3.5
    fb = B.freedman_bound(mean, variance_bits=var, alpha=a, coded_bits=2000, train_tokens=n,
                          sample_tokens=None, vocab_size=v, center=c)
    s_exact = (var * (n - 1) / n + (mean - c) ** 2) / rng**2
    gap, lam = B.freedman_gap(B.log_prior_nats(2000), n, s_exact, rng, 0.05)
    assert close(fb.bound_bits, mean + gap) and fb.lam == lam and fb.sampling_bits == 0
    assert lo < c < lo + rng


def test_freedman_decomposition():
    fb = B.freedman_bound({0.1: 4.2, 0.5: 4.8}, variance_bits={0.1: 3.0, 0.5: 2.0},
                          coded_bits=1e5, train_tokens=1e9, sample_tokens=1e5, vocab_size=1000,
                          unsmoothed_bits=4.1, unquantized_bits=3.9)
    dec = fb.decomposition
    assert close(dec["quantization_gap_bits"], 0.2)
    assert close(dec["smoothing_cost_bits"], fb.empirical_bits - 4.1)
    assert close(fb.parameters_per_token_nats, fb.log_prior_nats / 1e9)


def test_bernstein_and_hoeffding_terms():
    assert close(B.hoeffding_term(10, 100, 0.05), 10 * math.sqrt(math.log(20) / 200))
    lt = math.log(2 / 0.05)
    want = 10 * (math.sqrt(2 * 0.04 * lt / 100) + 7 * lt / (3 * 99))
    assert close(B.bernstein_term(10, 100, 0.05, 4.0), want)
    # empirical Bernstein is much tighter when the deviation << range and s is large
    assert B.bernstein_term(20, 1e6, 0.05, 4.0) < 0.3 * B.hoeffding_term(20, 1e6, 0.05)
    ub = B.variance_upper_bound(10, 1000, 0.05, 4.0)
    assert close(ub, (2 + 10 * math.sqrt(2 * math.log(20) / 999)) ** 2)
    assert B.variance_upper_bound(10, 2, 0.05, 4.0) == 25.0  # capped at Delta^2 / 4


def test_document_and_parameter_count_are_vacuous_at_scale():
    emp = {0.1: 4.0}
    doc = B.document_bound(emp, coded_bits=5e7, train_documents=1e6, sample_documents=1e4,
                           vocab_size=V_EX)
    tok = B.token_bound(emp, coded_bits=5e7, train_tokens=9e9, sample_tokens=1e4, vocab_size=V_EX)
    assert doc.vacuous and not tok.vacuous and doc.level == "document"
    pc = B.parameter_count_bound(4.0, num_parameters=1.2e8, train_documents=1e6,
                                 vocab_size=V_EX, alpha=0.1)
    lp = 1.2e8 * 16 * math.log(2)
    assert close(pc.bound, 4.0 + B.loss_range_bits(0.1, V_EX) * math.sqrt((lp + math.log(20)) / 2e6))
    assert pc.vacuous


def test_mutual_information_bound():
    b = B.mutual_information_bound(3.0, coded_bits=1000, train_points=1e6, loss_range_bits=10)
    info = B.log_prior_nats(1000)
    assert close(b.bound, 3.0 + math.sqrt(2 * 25 * info / 1e6))
    assert b.kind == "expectation" and math.isnan(b.delta)


# ------------------------------------------------------------------ coding


@given(st.lists(st.integers(0, 40), min_size=0, max_size=300), st.booleans())
def test_encode_decode_roundtrip(values, dense):
    x = np.asarray(values, dtype=np.int64)
    kw = {"num_levels": 41} if dense else {}
    enc = B.encode_symbols(x, **kw)
    np.testing.assert_array_equal(B.decode_symbols(enc), x)
    ml = B.message_length_bits(x, **kw)
    assert ml.payload_bits == enc.payload_bits
    assert ml.total_bits == ml.payload_bits + ml.side_bits


def test_encode_decode_large_sparse_values():
    rng = np.random.default_rng(1)
    x = rng.choice(np.array([3, 1_000_000, 7, 2**40]), size=20_000, p=[0.7, 0.1, 0.15, 0.05])
    enc = B.encode_symbols(x)
    assert enc.words.dtype == np.uint32
    np.testing.assert_array_equal(B.decode_symbols(enc), x)


def test_exact_coder_close_to_entropy():
    rng = np.random.default_rng(2)
    x = rng.choice(16, size=200_000, p=np.r_[np.full(8, 0.1), np.full(8, 0.025)])
    ml = B.message_length_bits(x, num_levels=16)
    lotfi = B.message_length_bits(x, num_levels=16, mode="lotfi-code")
    assert ml.entropy_bits <= ml.payload_bits <= ml.entropy_bits * 1.001 + 64
    assert abs(ml.total_bits - lotfi.total_bits) / lotfi.total_bits < 0.005
    assert ml.side["codebook_bits"] == 16 * 16
    assert B.message_length_bits(x, num_levels=16, codebook_bits_per_entry=0).side["codebook_bits"] == 0
    json.dumps(ml.to_dict())


def test_coding_edge_cases():
    ml = B.message_length_bits(np.zeros(100, dtype=np.int32))
    assert ml.payload_bits == 0 and ml.entropy_bits == 0
    np.testing.assert_array_equal(B.decode_symbols(B.encode_symbols(np.full(5, 9))), np.full(5, 9))
    assert B.decode_symbols(B.encode_symbols(np.zeros(0, dtype=np.int64))).size == 0
    with pytest.raises(ValueError, match="integer dtype"):
        B.message_length_bits(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        B.message_length_bits(np.array([-1, 2]))
    with pytest.raises(ValueError, match="out of range"):
        B.message_length_bits(np.array([0, 5]), num_levels=4)
    with pytest.raises(ValueError, match="1-D"):
        B.message_length_bits(np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="mode"):
        B.message_length_bits(np.array([0, 1]), mode="fast")


# ------------------------------------------------------------------ validation

TB_KW = dict(coded_bits=1e5, train_tokens=1e8, sample_tokens=1e4, vocab_size=1000)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": float("nan")}, "delta"),
        ({"coded_bits": -1.0}, "coded_bits"),
        ({"train_tokens": -5}, "train_tokens"),
        ({"sample_tokens": 0}, "sample_tokens"),
        ({"sample_tokens": 2e8}, "exceeds"),
        ({"extra_bits": -1}, "extra_bits"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"alpha_cost": "free"}, "alpha_cost"),
        ({"sampling": "chernoff"}, "sampling"),
    ],
)
def test_token_bound_validation(change, match):
    kw = {**TB_KW, **change}
    with pytest.raises(ValueError, match=match):
        B.token_bound({0.1: 4.0}, **kw)


@pytest.mark.parametrize(
    "emp, extra, match",
    [
        ({0.0: 4.0}, {}, "alpha"),
        ({1.5: 4.0}, {}, "alpha"),
        ({0.1: float("nan")}, {}, "NaN"),
        ({0.1: 100.0}, {}, "outside"),
        (4.0, {}, "alpha=..."),
        ({}, {}, "empty"),
        ({0.1: 4.0}, {"sampling": "bernstein"}, "variance"),
        ({0.1: 4.0}, {"sampling": "bernstein", "variance_bits": {0.1: -1.0}}, "variance"),
        ({0.1: 4.0}, {"sampling": "bernstein", "variance_bits": {0.1: float("nan")}}, "NaN"),
    ],
)
def test_token_bound_bad_statistics(emp, extra, match):
    with pytest.raises(ValueError, match=match):
        B.token_bound(emp, **TB_KW, **extra)


def test_other_validation():
    with pytest.raises(ValueError, match="error_rate"):
        B.topk_bound(1.2, coded_bits=1, train_tokens=10, sample_tokens=5)
    with pytest.raises(ValueError, match="delta"):
        B.freedman_gap(1.0, 10, 0.1, 1.0, delta=1.5)
    with pytest.raises(ValueError, match="NaN"):
        B.freedman_gap(1.0, 10, float("nan"), 1.0)
    with pytest.raises(ValueError, match="center"):
        B.freedman_bound(4.0, variance_bits=1.0, alpha=0.1, center=-3.0, **TB_KW)
    with pytest.raises(ValueError, match="center_grid"):
        B.freedman_bound(4.0, variance_bits=1.0, alpha=0.1, center_grid=0, **TB_KW)
    with pytest.raises(ValueError, match="num_parameters"):
        B.parameter_count_bound(4.0, num_parameters=-1, train_documents=10, loss_range_bits=10)
    with pytest.raises(ValueError, match="losses"):
        B.excess_description_length([1.0, float("nan")], 0.5)
    with pytest.raises(ValueError, match="> 0"):
        B.fit_power_law([1, 2, 3], [1, -2, 3])


# ------------------------------------------------------------------ from_stats / CLI


def _stats(n: int = 5000, seed: int = 0) -> LossStats:
    rng = np.random.default_rng(seed)
    s = LossStats(vocab_size=1000)
    s.count = n
    x = 3.0 + rng.gamma(2.0, 1.0, size=(n, len(DEFAULT_ALPHAS)))
    s.mean = x.mean(0)
    s.m2 = ((x - s.mean) ** 2).sum(0)
    s.nll_moments = (float(s.mean[0]) - 0.01, float(s.m2[0]), 0.0, 0.0)
    s.topk_correct = {k: int(n * min(0.95, 0.3 + 0.05 * k)) for k in s.topk_correct}
    return s


def test_from_stats_all_inputs_agree(tmp_path):
    stats = _stats()
    path = tmp_path / "stats.json"
    path.write_text(stats.to_json())
    tables = [B.from_stats(x, 1e5, 1e8) for x in (stats, stats.state_dict(), str(path), path)]
    vals = [t.best["bound_bits"] for t in tables]
    assert len(set(vals)) == 1
    t = tables[0]
    tb = B.token_bound(stats.mean_bits, coded_bits=1e5, train_tokens=1e8, sample_tokens=5000,
                       vocab_size=1000, alpha_cost="lotfi-code")
    assert close(t.bounds["token, official (lotfi-code, Hoeffding)"].bound_bits, tb.bound_bits)
    assert t.best["delta_each"] == 0.05 / 4 and len(t.best["among"]) == 4
    assert t.best["bound_bits"] >= min(t.bounds[k].bound_bits for k in t.best["among"])
    json.dumps(t.to_dict())
    assert "best:" in t.format_table()


def test_from_stats_validation():
    stats = _stats()
    bad = stats.state_dict()
    bad["mean"][2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        B.from_stats(bad, 1e5, 1e8)
    bad = stats.state_dict()
    bad["count"] = -3
    with pytest.raises(ValueError, match="count"):
        B.from_stats(bad, 1e5, 1e8)
    with pytest.raises(ValueError, match="more than m"):
        B.from_stats(stats, 1e5, 100)
    with pytest.raises(ValueError, match="format"):
        B.from_stats({"alphas": []}, 1e5, 1e8)
    with pytest.raises(ValueError, match="cannot read"):
        B.from_stats("/nonexistent/stats.json", 1e5, 1e8)


def test_cli_bound(tmp_path, capsys):
    from tokenbounds.cli import main

    path = tmp_path / "stats.json"
    path.write_text(_stats().to_json())
    argv = ["bound", "--stats", str(path), "--coded-bits", "1e5", "--train-tokens", "1e8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Freedman (union, empirical Bernstein)" in out and "best:" in out
    assert main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "token (union, Hoeffding)" in data["bounds"]
    assert main(argv + ["--delta", "1.5"]) == 2
    assert "delta" in capsys.readouterr().err


def test_import_without_torch():
    # The bounds subpackage itself must not need torch. The parent package tokenbounds imports
    # torch for its kernels, so load the subpackage under a torch-free stub parent.
    code = textwrap.dedent(
        f"""
        import sys, types
        sys.modules["torch"] = None
        pkg = types.ModuleType("tokenbounds")
        pkg.__path__ = [{str(REPO / "pyext")!r}]
        sys.modules["tokenbounds"] = pkg
        import tokenbounds.bounds as B
        import numpy as np
        st = {{"format": "tokenbounds.LossStats/1", "alphas": [0.1], "vocab_size": 100,
               "count": 100, "mean": [3.0], "m2": [50.0], "min_bits": [0.1],
               "max_bits": [8.0], "nll_moments": [2.9, 50.0, 0.0, 0.0],
               "topk_correct": {{"1": 40}}}}
        t = B.from_stats(st, 1000, 10**6)
        assert t.best["bound_bits"] > 3.0
        assert (B.decode_symbols(B.encode_symbols(np.arange(10))) == np.arange(10)).all()
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_import_tokenbounds_bounds_without_torch():
    """`import tokenbounds.bounds` (through the top-level package) with torch blocked."""
    code = "import sys; sys.modules['torch'] = None\nimport tokenbounds.bounds\nprint('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------ prequential / scaling


def test_edl_examples():
    r = B.excess_description_length([2.0, 1.5, 1.2, 1.0, 0.9], 0.8, num_tokens=50, num_parameters=10)
    assert close(r.edl, 2.6) and close(r.mdl, 6.6)
    assert close(r.edl_per_example, 0.52) and close(r.edl_per_token, 0.052)
    assert close(r.edl_per_parameter, 0.26)
    assert close(B.prequential_code_length([1, 2, 3]), 6.0)
    assert abs(B.coupon_collector_edl_fraction(1.0) - 0.264241) < 5e-7
    assert close(B.prequential_complexity_bits([3.0, 2.0], [1.0, 1.0], algorithm_bits=5), 8.0)


def test_coupon_collector_simulation():
    # K facts worth Delta each; an example costs Delta iff its fact is new; test loss = Delta x
    # fraction of unseen facts. E[EDL]/(K Delta) -> 1 - (1 + u) e^-u for large K.
    rng = np.random.default_rng(3)
    k, delta_bits, u = 2000, 3.0, 1.0
    n = int(u * k)
    fracs = []
    for _ in range(20):
        facts = rng.integers(0, k, size=n)
        seen = np.zeros(k, bool)
        losses = np.empty(n)
        for i, f in enumerate(facts):
            losses[i] = 0.0 if seen[f] else delta_bits
            seen[f] = True
        test_loss = delta_bits * (1 - seen.mean())
        fracs.append(B.excess_description_length(losses, test_loss).edl / (k * delta_bits))
    assert abs(np.mean(fracs) - B.coupon_collector_edl_fraction(u)) < 0.01


def test_scaling_helpers():
    assert B.training_flops(1e9, 2e10) == 1.2e20
    assert B.chinchilla_tokens(7e9) == 1.4e11
    assert close(B.chinchilla_loss_nats(1e9, 2e10), 1.69 + 406.4 / 1e9**0.34 + 410.7 / 2e10**0.28)
    n, d = B.compute_optimal(1.2e20)
    assert close(n, 1e9) and close(d, 2e10)
    n_fit, d_fit = B.compute_optimal(1e21, method="fit")
    assert close(6 * n_fit * d_fit, 1e21)
    # the fitted optimum minimises the loss along the budget line
    for f in (0.9, 1.1):
        assert B.chinchilla_loss_nats(n_fit * f, 1e21 / (6 * n_fit * f)) > B.chinchilla_loss_nats(n_fit, d_fit)


def test_power_law_fit():
    rng = np.random.default_rng(4)
    x = np.logspace(6, 9, 12)
    y = 30.0 * x**-0.3 * np.exp(rng.normal(0, 0.02, x.size))
    fit = B.fit_power_law(x, y)
    assert fit.exponent_ci[0] < -0.3 < fit.exponent_ci[1]
    assert fit.prefactor_ci[0] < 30.0 < fit.prefactor_ci[1]
    assert fit.r_squared > 0.99
    exact = B.fit_power_law(x, 2.0 * x**0.5)
    assert close(exact.exponent, 0.5, rel=1e-9) and close(exact.prefactor, 2.0, rel=1e-6)
