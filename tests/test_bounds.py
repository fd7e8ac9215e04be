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
from tokenbounds.bounds.from_stats import CORRECTED_LABEL, OFFICIAL_LABEL
from tokenbounds.losses import DEFAULT_ALPHAS, LossStats, UnitStats

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
    # the official formula with a sample does not hold at delta, and says so (finding 1)
    assert not tb.valid and tb.kind == "official-formula"
    assert tb.label.startswith(B.results.OFFICIAL_UNPAID)
    assert "0.6004" in tb.caveats[0]  # 1 - (r delta + 8 (1 - r) delta)
    # after a full pass (no sampling term) the same formula is a bound
    full = B.token_bound(emp, coded_bits=C_EX, train_tokens=M_EX, sample_tokens=None,
                         vocab_size=V_EX, extra_bits=7, alpha_cost="lotfi-code")
    assert full.valid and full.kind == "high-probability" and full.sampling_bits == 0


def test_token_bound_lotfi_code_corrected():
    """The corrected official form: 8 i bits in the prior, sampling term at (1 - r) delta / G."""
    emp = {a: 5.0 for a in DEFAULT_ALPHAS}
    kw = dict(coded_bits=C_EX, train_tokens=M_EX, sample_tokens=S_EX, vocab_size=V_EX, extra_bits=7)
    off = B.token_bound(emp, alpha_cost="lotfi-code", **kw)
    cor = B.token_bound(emp, alpha_cost="lotfi-code-corrected", **kw)
    assert cor.valid and cor.kind == "high-probability"
    r = S_EX / (S_EX + M_EX)
    for c_off, c_cor in zip(off.candidates, cor.candidates, strict=True):
        assert close(c_cor["complexity_bits"], c_off["complexity_bits"])
        want = c_cor["loss_range_bits"] * math.sqrt(-math.log((1 - r) * 0.05 / 8) / (2 * S_EX))
        assert close(c_cor["sampling_bits"], want)
    assert cor.bound_bits > off.bound_bits
    # union is never looser than the corrected official cost (ln 8 nats < 8 i bits)
    assert B.token_bound(emp, **kw).bound_bits <= cor.bound_bits
    assert B.token_bound(emp, alpha_cost="lotfi-code", **{**kw, "sample_tokens": None}).valid


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
    official = t.bounds[OFFICIAL_LABEL]
    assert close(official.bound_bits, tb.bound_bits)
    assert "official formula as published: smoothing choice unpaid in the sampling term, not valid " \
           "at delta" in OFFICIAL_LABEL
    assert not official.valid and official.kind == "official-formula"
    assert t.bounds[CORRECTED_LABEL].valid
    assert t.best["delta_each"] == 0.05 / 4 and len(t.best["among"]) == 4 and t.best["valid"]
    assert t.inputs["design"] == "tokens" and t.inputs["s"] == 5000
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
    assert "not valid at delta" in out and "not bounds at delta:" in out
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
               "count": 100, "mean": [3.0], "m2": [50.0], "m3": [0.0], "m4": [0.0], "min_bits": [0.1],
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
    est = B.prequential_information_bits([3.0, 2.0], [1.0, 1.0], algorithm_bits=5)
    assert close(est.bits, 8.0) and est.details["mdl_bits"] == 5.0
    with pytest.warns(DeprecationWarning, match="prequential_information_bits"):
        assert B.prequential_complexity_bits([3.0, 2.0], [1.0, 1.0], algorithm_bits=5) == est


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


# ------------------------------------------------------------------ designs: stats.json, window units


def _token_losses(p_y: np.ndarray, rank: np.ndarray, vocab: int = 1000):
    from tokenbounds.losses import TokenLosses

    a = np.asarray(DEFAULT_ALPHAS)[None, :]
    nll = -np.log2((1 - a) * p_y[:, None] + a / vocab)
    return TokenLosses(nll_bits=nll.astype(np.float32), logp=np.log(p_y).astype(np.float32),
                       rank=rank.astype(np.int32), valid=np.ones(p_y.size, bool),
                       alphas=DEFAULT_ALPHAS, vocab_size=vocab)


def _window_sample(n_units: int = 200, size: int = 32, draws: int = 150, seed: int = 0):
    """A stream of n_units windows of `size` targets whose difficulty varies by window, `draws`
    uniform positions mapped to their units: (per-token LossStats with multiplicity, UnitStats,
    m, per-unit nll_bits [units, size, A] of the whole stream, draw weights per unit)."""
    rng = np.random.default_rng(seed)
    m = n_units * size
    shape = np.repeat(rng.uniform(0.3, 3.0, n_units), size)
    p_y = np.clip(rng.beta(shape, 2.0), 1e-6, 1.0)
    rank = rng.integers(0, 20, m) * (p_y < 0.5)
    weights = np.bincount(rng.integers(0, m, draws) // size, minlength=n_units)
    hit = np.nonzero(weights)[0]
    rows = (hit[:, None] * size + np.arange(size)[None, :]).ravel()
    units = UnitStats(vocab_size=1000).update(_token_losses(p_y[rows], rank[rows]),
                                              np.repeat(np.arange(hit.size), size), weights[hit])
    rep = np.repeat(rows, np.repeat(weights[hit], size))
    tokens = LossStats(vocab_size=1000).update(_token_losses(p_y[rep], rank[rep]))
    nll = np.asarray(_token_losses(p_y, rank).nll_bits, dtype=np.float64).reshape(n_units, size, -1)
    return tokens, units, m, nll, weights


def _document(tokens, units, m, *, mode="windows", full_pass=False, draws=None, **extra):
    doc = {**tokens.state_dict(), "evaluation": {
        "format": "tokenbounds.evaluate/2", "m": m,
        "scoring": {"mode": mode, "window": 64, "stride": 32, "units": m // 32,
                    "draws": draws if draws is not None else (None if units is None else units.draws),
                    "full_pass": full_pass, "prefix_token": None, "reset_at_eot": False},
        "coded": {"coded_bits": 1e4}, "delta": 0.05, "extra_bits": 3.0, "vocab_size": 1000, **extra}}
    if units is not None:
        doc["unit_stats"] = units.state_dict()
    return doc


def test_window_units_token_bound_uses_unit_means(tmp_path):
    tokens, units, m, _, _ = _window_sample()
    doc = _document(tokens, units, m)
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(doc))
    t = B.from_stats(path)  # C, m, delta, extra bits, V all from the document
    assert t.inputs["design"] == "units" and t.inputs["s"] == units.draws and t.inputs["coded_bits"] == 1e4
    var = dict(zip(units.alphas, units.variance_bits, strict=True))
    for sampling in ("hoeffding", "bernstein"):
        want = B.token_bound(units.mean_bits, variance_bits=var, coded_bits=1e4, extra_bits=3.0,
                             train_tokens=m, sample_tokens=units.draws, vocab_size=1000, sampling=sampling)
        key = "token (union, Hoeffding)" if sampling == "hoeffding" else "token (union, empirical Bernstein)"
        assert close(t.bounds[key].bound_bits, want.bound_bits)
        assert t.bounds[key].design == "units" and "window-unit draws" in t.bounds[key].label
    top = t.bounds["top-1 error (bernstein)"]
    want = B.topk_bound(units.topk_error(1), coded_bits=1e4, extra_bits=3.0, train_tokens=m,
                        sample_tokens=units.draws, sampling="bernstein",
                        error_variance=units.topk_error_variance(1))
    assert close(top.bound_bits, want.bound_bits)
    # the same statistics passed as objects, or as a plain LossStats + units=
    same = [B.from_stats(units, 1e4, m, extra_bits=3.0),
            B.from_stats(tokens, 1e4, m, extra_bits=3.0, units=units),
            B.from_stats(doc["unit_stats"], 1e4, m, extra_bits=3.0, vocab_size=1000)]
    assert {x.best["bound_bits"] for x in same} == {t.best["bound_bits"]}


@pytest.mark.parametrize("sampling", ["hoeffding", "bernstein"])
def test_window_units_freedman_matches_direct_computation(sampling):
    """Spec 3b: every centering c's unit mean W(c) of ((X - c)/Delta)^2 bounded above over the
    draws (union over c), the three-way delta split; recomputed here from the tokens."""
    tokens, units, m, nll, weights = _window_sample(seed=1)
    a, v, k, d = 0.1, 1000, 4, 0.05
    j = DEFAULT_ALPHAS.index(a)
    lo, rng = B.min_loss_bits(a, v), B.loss_range_bits(a, v)
    s = int(weights.sum())
    per_draw = np.repeat(np.arange(weights.size), weights)  # unit of each draw
    y = nll[per_draw, :, j].mean(1)
    r = s / (s + m)
    d_f, d_each = r * d, (1 - r) * d / 2
    lp = B.log_prior_nats(1e4)
    if sampling == "hoeffding":
        samp = rng * math.sqrt(math.log(1 / d_each) / (2 * s))
    else:
        samp = B.bernstein_term(rng, s, d_each, y.var(ddof=1))
    ubs = []
    for c in lo + (np.arange(k) + 0.5) / k * rng:
        w = (((nll[per_draw, :, j] - c) / rng) ** 2).mean(1)
        dd = d_each / k
        if sampling == "hoeffding":
            ub = w.mean() + math.sqrt(math.log(1 / dd) / (2 * s))
        else:
            lt = math.log(2 / dd)
            ub = w.mean() + math.sqrt(2 * w.var(ddof=1) * lt / s) + 7 * lt / (3 * (s - 1))
        ubs.append(min(1.0, ub))
    cc = (lp + math.log(59 * k / d_f)) / m
    lam = B.LAMBDA_GRID
    gap = rng * np.min(cc / lam + B.psi(lam) / lam * min(ubs))
    fb = B.freedman_bound(units.mean_bits[a], alpha=a, variance_bits=float(units.variance_bits[j]),
                          coded_bits=1e4, train_tokens=m, sample_tokens=s, vocab_size=v, center_grid=k,
                          sampling=sampling, sample_design="units", unit_stats=units)
    assert close(fb.empirical_bits, y.mean(), rel=1e-7)
    assert close(fb.sampling_bits, samp, rel=1e-7)
    assert close(fb.gap_bits, gap, rel=1e-7)
    assert close(fb.scaled_variance, min(ubs), rel=1e-7)
    assert fb.design == "units" and fb.valid and close(sum(fb.delta_split.values()), d)


def test_window_units_bad_input():
    tokens, units, m, _, _ = _window_sample(seed=2)
    kw = dict(coded_bits=1e4, train_tokens=m, vocab_size=1000, alpha=0.1,
              empirical_bits=units.mean_bits[0.1], variance_bits=1.0)
    with pytest.raises(ValueError, match="needs unit_stats"):
        B.freedman_bound(sample_tokens=units.draws, sample_design="units", **kw)
    with pytest.raises(ValueError, match="draws"):
        B.freedman_bound(sample_tokens=units.draws - 1, sample_design="units", unit_stats=units, **kw)
    with pytest.raises(ValueError, match="mean of unit means"):
        B.freedman_bound(sample_tokens=units.draws, sample_design="units", unit_stats=units,
                         **{**kw, "empirical_bits": units.mean_bits[0.1] + 0.01})
    with pytest.raises(ValueError, match="sample_design='units'"):
        B.freedman_bound(sample_tokens=units.draws, unit_stats=units, **kw)
    with pytest.raises(ValueError, match="sample_design"):
        B.token_bound(4.0, alpha=0.1, coded_bits=1, train_tokens=100, sample_tokens=10,
                      vocab_size=1000, sample_design="clusters")
    with pytest.raises(ValueError, match="error_variance"):
        B.topk_bound(0.5, coded_bits=1, train_tokens=100, sample_tokens=10, sampling="bernstein",
                     sample_design="units")


def test_stats_document_designs_and_contradictions():
    tokens, units, m, _, _ = _window_sample(seed=3)
    doc = _document(tokens, units, m)
    # a full pass: count = m, no sampling term, two candidates at delta / 2
    full_tokens = LossStats(vocab_size=1000, count=m, mean=tokens.mean, m2=tokens.m2 / tokens.count * m,
                            nll_moments=tokens.nll_moments, topk_correct=tokens.topk_correct)
    full_doc = _document(full_tokens, None, m, full_pass=True)
    t = B.from_stats(full_doc)
    assert t.inputs["design"] == "full-pass" and t.inputs["s"] is None
    assert t.best["among"] == ["token (union, full pass)", "Freedman (union, full pass)"]
    assert t.best["delta_each"] == 0.025
    assert all(r["sampling"] == 0 for r in t.rows() if r["kind"] != "expectation")
    assert t.bounds["token, official formula (lotfi-code), full pass"].valid
    assert B.from_stats(full_tokens, 1e4, m, extra_bits=3.0, full_pass=True).best == t.best
    # a per-token sample
    tok_doc = _document(tokens, None, m, mode="per-token", draws=tokens.count)
    assert B.from_stats(tok_doc).inputs["design"] == "tokens"
    # contradictions are errors
    with pytest.raises(ValueError, match="m disagrees"):
        B.from_stats(doc, m=m + 1)
    with pytest.raises(ValueError, match="coded_bits disagrees"):
        B.from_stats(doc, coded_bits=2e4)
    with pytest.raises(ValueError, match="vocab_size disagrees"):
        B.from_stats(doc, vocab_size=999)
    with pytest.raises(ValueError, match="less than"):
        B.from_stats(doc, extra_bits=1.0)
    assert B.from_stats(doc, extra_bits=5.0).inputs["extra_bits"] == 5.0  # paying more is fine
    with pytest.raises(ValueError, match="not a full pass"):
        B.from_stats(doc, full_pass=True)
    with pytest.raises(ValueError, match="contradicts"):
        B.from_stats(full_doc, full_pass=False)
    with pytest.raises(ValueError, match="must cover every data point"):
        B.from_stats(tokens, 1e4, m, full_pass=True)
    no_units = {k: v for k, v in doc.items() if k != "unit_stats"}
    with pytest.raises(ValueError, match="not independent draws"):
        B.from_stats(no_units)
    with pytest.raises(ValueError, match="number of draws"):
        B.from_stats(_document(tokens, units, m, draws=units.draws + 1))
    with pytest.raises(ValueError, match="not the same evaluation"):
        B.from_stats(_document(full_tokens, units, m))
    with pytest.raises(ValueError, match="already hold"):
        B.from_stats(doc, units=units)
    with pytest.raises(ValueError, match="per-token"):
        B.from_stats(_document(tokens, units, m, mode="per-token"))
    bad = dict(doc, unit_stats={**doc["unit_stats"], "sum_y": [float("nan")] * 8})
    with pytest.raises(ValueError, match="NaN"):
        B.from_stats(bad)
    with pytest.raises(ValueError, match="malformed UnitStats"):
        B.from_stats(dict(doc, unit_stats={"format": "tokenbounds.UnitStats/1"}))
    with pytest.raises(ValueError, match="format"):
        B.from_stats({"format": "tokenbounds.other/1"})


def test_paired_quantization_gap():
    quant = _stats(seed=1)
    unq = _stats(seed=2)
    unq.nll_moments = (quant.nll_moments[0] - 0.2, *unq.nll_moments[1:])
    t = B.from_stats(quant, 1e5, 1e8, unquantized_stats=unq)
    dec = t.bounds["Freedman (union, empirical Bernstein)"].decomposition
    assert close(dec["quantization_gap_bits"], 0.2) and t.inputs["unquantized_paired"]
    other = _stats(n=4000, seed=2)
    with pytest.raises(ValueError, match="paired"):
        B.from_stats(quant, 1e5, 1e8, unquantized_stats=other)
    with pytest.raises(ValueError, match="not both"):
        B.from_stats(quant, 1e5, 1e8, unquantized_stats=unq, unquantized_bits=3.0)
    tokens, units, m, _, _ = _window_sample(seed=4)
    with pytest.raises(ValueError, match="same tokens"):
        B.from_stats(_document(tokens, units, m), unquantized_stats=quant)
    doc_a = _document(tokens, units, m, sample={"positions_sha256": "a" * 64})
    doc_b = _document(tokens, units, m, sample={"positions_sha256": "b" * 64})
    with pytest.raises(ValueError, match="other positions"):
        B.from_stats(doc_a, unquantized_stats=doc_b)
    assert B.from_stats(doc_a, unquantized_stats=doc_a).inputs["unquantized_paired"]
    # unquantized_bits still works (documented: measured on the same tokens)
    t = B.from_stats(quant, 1e5, 1e8, unquantized_bits=quant.nll_moments[0] - 0.1)
    assert close(t.bounds["Freedman (union, Hoeffding)"].decomposition["quantization_gap_bits"], 0.1)


def test_illustrative_baselines_are_not_bounds():
    t = B.from_stats(_stats(), 1e5, 1e8, train_documents=1e5, num_parameters=1e6)
    for key in ("document-level (illustrative, not a bound)", "parameter-count (illustrative, not a bound)"):
        b = t.bounds[key]
        assert not b.valid and b.kind == "illustrative" and "illustrative, not a bound" in b.caveats[-1]
    assert "illustrative" in t.format_table()
    assert all(t.bounds[k].valid for k in t.best["among"])


def test_heuristic_prior_is_marked():
    est = B.prequential_information_bits([3.0, 2.0, 1.5], [1.0, 1.0, 1.0])
    kw = dict(train_tokens=1e6, sample_tokens=1e4, vocab_size=1000)
    tb = B.token_bound({0.1: 4.0}, coded_bits=est, **kw)
    assert not tb.valid and tb.kind == "heuristic" and "information-content estimate" in tb.caveats[0]
    assert close(tb.bound_bits, B.token_bound({0.1: 4.0}, coded_bits=est.bits, **kw).bound_bits)
    fb = B.freedman_bound({0.1: 4.0}, variance_bits={0.1: 1.0}, coded_bits=est, **kw)
    assert fb.kind == "heuristic"
    assert B.topk_bound(0.5, coded_bits=est, train_tokens=1e6, sample_tokens=1e4).kind == "heuristic"
    assert B.mutual_information_bound(3.0, coded_bits=est, train_points=1e6, loss_range_bits=10).kind == "heuristic"
    t = B.from_stats(_stats(), est, 1e8)
    assert not any(r["valid"] for r in t.rows()) and not t.best["valid"]
    with pytest.raises(ValueError, match="must be a number"):
        B.log_prior_nats(est)  # no silent float() conversion anywhere else
    with pytest.raises(TypeError):
        float(est)


def test_sample_reuse_pays_in_the_sampling_term():
    kw = dict(coded_bits=1e5, train_tokens=1e8, sample_tokens=1e4, vocab_size=1000, extra_bits=10)
    once = B.token_bound({0.1: 4.0, 0.5: 4.5}, **kw)
    tuned = B.token_bound({0.1: 4.0, 0.5: 4.5}, sample_reuse=1024, **kw)
    r = 1e4 / (1e4 + 1e8)
    for c in tuned.candidates:
        want = c["loss_range_bits"] * math.sqrt(-math.log((1 - r) * 0.05 / 2 / 1024) / 2e4)
        assert close(c["sampling_bits"], want)
    assert tuned.complexity_bits == once.complexity_bits and tuned.sample_reuse == 1024
    t = B.from_stats(_stats(), 1e5, 1e8, sample_reuse=1024)
    assert t.inputs["sample_reuse"] == 1024
    assert t.best["bound_bits"] > B.from_stats(_stats(), 1e5, 1e8).best["bound_bits"]
    with pytest.raises(ValueError, match="sample_reuse"):
        B.token_bound({0.1: 4.0}, sample_reuse=0, **kw)


def test_one_result_shape():
    tokens, units, m, _, _ = _window_sample(seed=5)
    base = ("bound_bits", "empirical_bits", "complexity_bits", "sampling_bits", "alpha", "delta",
            "vacuous", "valid", "kind", "label")
    for table in (B.from_stats(_stats(), 1e5, 1e8, train_documents=1e5, num_parameters=1e6, topk=(1, 10)),
                  B.from_stats(_document(tokens, units, m))):
        for label, b in table.bounds.items():
            assert isinstance(b, B.BoundResult), label
            d = b.to_dict()
            assert all(k in d for k in base), label
            assert b.kind in B.results.KINDS and b.label
            assert b.valid == (b.kind in ("high-probability", "expectation"))
        for row in table.rows():
            assert set(row) == {"bound", "value", "empirical", "complexity", "sampling", "alpha",
                                "vacuous", "kind", "valid", "label", "delta"}
        assert set(table.best) >= {"label", "bound_bits", "among", "delta_each"}
        assert set(table.primary) == {"token", "freedman"}
        json.dumps(table.to_dict())
    fb = table.bounds["Freedman (union, empirical Bernstein)"]
    row = next(r for r in table.rows() if r["bound"] == "Freedman (union, empirical Bernstein)")
    assert row["complexity"] == fb.gap_bits  # the Freedman gap in the complexity column


def test_cli_bound_reads_documents(tmp_path, capsys):
    from tokenbounds.cli import main

    tokens, units, m, _, _ = _window_sample(seed=6)
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(_document(tokens, units, m)))
    assert main(["bound", "--stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert "window-unit sample" in out and f"s = {units.draws:,} draws" in out
    assert "official formula as published: smoothing choice unpaid in the sampling term" in out
    assert main(["bound", "--stats", str(path), "--train-tokens", str(m + 1)]) == 2
    assert "disagrees" in capsys.readouterr().err
    plain, upath = tmp_path / "tokens.json", tmp_path / "units.json"
    plain.write_text(tokens.to_json())
    upath.write_text(units.to_json())
    argv = ["bound", "--stats", str(plain), "--units", str(upath), "--coded-bits", "1e4",
            "--train-tokens", str(m), "--extra-bits", "3", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"]["design"] == "units"
    assert main(argv + ["--unquantized-stats", str(plain)]) == 2
    assert "same tokens" in capsys.readouterr().err
