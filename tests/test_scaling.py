"""`tokenbounds scaling` (issue 16): a tiny 2-size sweep end to end, each size's bound recomputed
from its saved statistics by `tokenbounds bound`, resume from the cache, the power-law fits on
synthetic data, the monotonicity / extrapolation logic, and clear errors for bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
from tokenbounds.cli import main
from tokenbounds.eval.fileio import read_json
from tokenbounds.scaling.corpus import build_scaling_corpus, chunk_document
from tokenbounds.scaling.report import extrapolate, fit_components, monotonicity
from tokenbounds.scaling.sweep import TINY_SCALING_CONFIG, model_tokens, run_sweep, sweep_plan


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    args = ["scaling", "--tiny", "--cache-dir", str(root / "cache"), "--out", str(root / "out"), "--no-progress",
            "--threads", "1", "--results-md", str(root / "section.md")]
    assert main(args) == 0
    return root, args


def test_tiny_sweep_end_to_end(tiny_sweep):
    root, _ = tiny_sweep
    out = root / "out"
    res = json.loads((out / "results.json").read_text())
    models = res["models"]
    assert [m["name"] for m in models] == ["A", "B"]
    assert models[0]["parameters"] < models[1]["parameters"]
    for m in models:
        # its own first D tokens, one epoch, D = steps * B * T within tokens_per_parameter * N
        steps, d = model_tokens(m["parameters"], TINY_SCALING_CONFIG)
        assert m["tokens_m"] == d == m["training"]["tokens"] and m["training"]["steps"] == steps
        assert d <= TINY_SCALING_CONFIG.tokens_per_parameter * m["parameters"]
        dec = m["decomposition"]
        parts = sum(dec[k] for k in ("unquantized_bits", "quantization_gap_bits", "smoothing_cost_bits",
                                     "complexity_bits", "variance_bits", "sampling_bits"))
        assert parts == pytest.approx(dec["bound_bits"], abs=1e-9)
        assert dec["sampling_bits"] == 0.0  # a full pass over m = D
        assert dec["quantization_gap_bits"] == pytest.approx(m["quantization"]["gap_nll_bits"])
        # the grid's size is paid in the prior
        assert m["code_length"]["extra_bits"] == pytest.approx(
            TINY_SCALING_CONFIG.selection_bits + math.log2(len(TINY_SCALING_CONFIG.grid)))
        assert os.path.exists(out / "models" / f"{m['name']}.json")
    png = (out / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| A |" in md and "| B |" in md and "Freedman bound" in md
    section = (root / "section.md").read_text()
    assert "not fitted" in section  # 2 sizes: no confidence interval is claimed


def test_each_bound_recomputes_from_saved_stats(tiny_sweep, capsys):
    root, _ = tiny_sweep
    for name in ("A", "B"):
        rec = read_json(str(root / "out" / "models" / f"{name}.json"))
        capsys.readouterr()
        assert main([*rec["bound_command"], "--json"]) == 0
        table = json.loads(capsys.readouterr().out)
        f = table["bounds"]["Freedman (union, full pass)"]
        assert f["bound_bits"] == pytest.approx(rec["decomposition"]["bound_bits"], rel=1e-12)
        assert f["decomposition"]["quantization_gap_bits"] == pytest.approx(
            rec["decomposition"]["quantization_gap_bits"], rel=1e-12)
        t = table["bounds"]["token (union, full pass)"]
        assert t["bound_bits"] == pytest.approx(rec["decomposition"]["token_bound_bits"], rel=1e-12)
        # paying less than the recorded extra bits is refused
        cmd = list(rec["bound_command"])
        cmd[cmd.index("--extra-bits") + 1] = "0"
        assert main(cmd) == 2


def test_rerun_reads_the_cache(tiny_sweep, capsys):
    root, args = tiny_sweep
    before = read_json(str(root / "out" / "models" / "B.json"))
    capsys.readouterr()
    assert main(args) == 0
    log = capsys.readouterr().out
    assert log.count("reusing the trained model") == 2 and "one epoch of" not in log
    after = read_json(str(root / "out" / "models" / "B.json"))
    assert after["decomposition"] == before["decomposition"]
    # nothing was requantized or rescored: every candidate's recorded time is the first run's
    assert [c["seconds"] for c in after["quantization"]["candidates"]] == [
        c["seconds"] for c in before["quantization"]["candidates"]]


def test_report_only_and_plan(tiny_sweep, capsys):
    root, args = tiny_sweep
    assert main([*args, "--report-only"]) == 0
    assert main(["scaling", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "| XXL |" in out and "total" in out


def test_power_law_fits_recover_known_exponents():
    rng = np.random.default_rng(0)
    n = np.geomspace(1e4, 1e6, 6)
    models = []
    for x in n:
        noise = lambda: float(np.exp(rng.normal(0, 0.01)))  # noqa: E731
        loss, gap = 40.0 * x**-0.2 * noise(), 3.0 * x**-0.1 * noise()
        dec = {"bound_bits": loss + gap, "unquantized_bits": loss, "sigma_bits": 2.0 * x**-0.05 * noise(),
               "variance_bits": 0.5 * x**-0.3 * noise(), "complexity_bits": 0.1 * noise(),
               "quantization_gap_bits": 0.01 * x**0.25 * noise(), "parameters_per_token_bits": 0.2 * noise()}
        models.append({"name": f"{x:.0f}", "parameters": float(x), "decomposition": dec,
                       "quantization": {"bits_per_parameter": 3.0 * x**-0.08 * noise()}})
    fits = fit_components(models)
    for key, b in (("unquantized_bits", -0.2), ("sigma_bits", -0.05), ("variance_bits", -0.3),
                   ("quantization_gap_bits", 0.25), ("complexity_bits", 0.0), ("bits_per_parameter", -0.08)):
        lo, hi = fits[key]["exponent_ci"]
        assert lo <= b <= hi, key
        assert abs(fits[key]["exponent"] - b) < 0.02
    # a wrong exponent is outside the interval (the interval is not vacuous)
    lo, hi = fits["unquantized_bits"]["exponent_ci"]
    assert not lo <= -0.25 <= hi


def _dec(loss, gap_terms):
    d = {"unquantized_bits": loss, "quantization_gap_bits": 0.0, "smoothing_cost_bits": 0.0,
         "complexity_bits": gap_terms, "variance_bits": 0.0, "sampling_bits": 0.0}
    d["bound_bits"] = sum(d.values())
    return d


def test_monotonicity_names_the_rising_term():
    ms = [{"name": "a", "parameters": 1e4, "decomposition": _dec(5.0, 0.1)},
          {"name": "b", "parameters": 1e5, "decomposition": _dec(4.0, 0.2)},
          {"name": "c", "parameters": 1e6, "decomposition": _dec(3.95, 0.5)}]
    mono = monotonicity(ms)
    assert not mono["monotone_decreasing"]
    assert mono["steps"][0]["falls"] and not mono["steps"][1]["falls"]
    assert mono["steps"][1]["rising_components"] == ["complexity_bits"]
    assert monotonicity(ms[:2])["monotone_decreasing"]


def test_extrapolation_finds_the_minimum():
    # loss = 10 N^-0.1 falls, gap = 1e-3 N^0.3 rises: the minimum solves a b N^b + c e N^e = 0
    fits = {"unquantized_bits": {"prefactor": 10.0, "exponent": -0.1},
            "gap_bits": {"prefactor": 1e-3, "exponent": 0.3}}
    ext = extrapolate(fits, 1e3)
    n_star = ext["minimum_at"]
    assert 10 * -0.1 * n_star**-0.1 + 1e-3 * 0.3 * n_star**0.3 == pytest.approx(0, abs=1e-12)
    assert not ext["falls_beyond"]
    both = extrapolate({"unquantized_bits": {"prefactor": 10.0, "exponent": -0.1},
                        "gap_bits": {"prefactor": 1.0, "exponent": -0.2}}, 1e3)
    assert both["falls_everywhere"]
    assert not extrapolate({}, 1e3)["available"]


def test_chunks_keep_every_character():
    text = "".join(f"line {i} " * (i % 7) + "\n" for i in range(500)) + "x" * 9000
    chunks = chunk_document(text, 1000)
    assert "".join(chunks) == text.replace("\n\n", "\n\n") or "".join(chunks).replace(" ", "") == text.replace(" ", "")
    assert max(len(c) for c in chunks) <= 1000
    with pytest.raises(ValueError, match="max_chars"):
        chunk_document(text, 0)


def test_corpus_is_reproducible_and_shuffled(tmp_path):
    a = build_scaling_corpus(str(tmp_path / "a"), ("tiny",), 300, log=lambda s: None)
    b = build_scaling_corpus(str(tmp_path / "b"), ("tiny",), 300, log=lambda s: None)
    assert a.tokens_sha256 == b.tokens_sha256 and a.n_tokens > 1000
    c = build_scaling_corpus(str(tmp_path / "c"), ("tiny",), 300, shuffle_seed=1, log=lambda s: None)
    assert c.tokens_sha256 != a.tokens_sha256 and c.n_tokens == a.n_tokens


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    cfg = TINY_SCALING_CONFIG
    with pytest.raises(ValueError, match="unknown corpus source"):
        build_scaling_corpus(str(tmp_path), ("nosuch",), 300)
    with pytest.raises(ValueError, match="grid is empty"):
        run_sweep(dataclasses.replace(cfg, grid=()), str(tmp_path), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="not sizes of the sweep"):
        run_sweep(cfg, str(tmp_path), str(tmp_path / "o"), only=("Z",))
    with pytest.raises(ValueError, match="needs D ="):
        run_sweep(dataclasses.replace(cfg, tokens_per_parameter=1e4), str(tmp_path), str(tmp_path / "o"),
                  progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="min_corpus_tokens"):
        run_sweep(dataclasses.replace(cfg, min_corpus_tokens=10**9), str(tmp_path), str(tmp_path / "o"),
                  log=lambda s: None)
    assert main(["scaling", "--tiny", "--delta", "2", "--out", str(tmp_path / "x")]) == 2
    assert main(["scaling", "--tiny", "--sizes", "9", "--out", str(tmp_path / "x")]) == 2
    assert main(["scaling", "--tiny", "--report-only", "--out", str(tmp_path / "empty")]) == 1
    assert "--report-only" in capsys.readouterr().out


def test_plan_counts_the_compute_optimal_budget():
    for r in sweep_plan(TINY_SCALING_CONFIG):
        assert r["flops_train"] == pytest.approx(6 * r["parameters"] * r["tokens"])


def test_passes_split_over_two_runs(tiny_sweep, tmp_path):
    root, _ = tiny_sweep
    cfg = dataclasses.replace(TINY_SCALING_CONFIG, sizes=TINY_SCALING_CONFIG.sizes[:1])
    quiet = dict(progress=False, log=lambda s: None)
    first = run_sweep(cfg, str(tmp_path / "c"), str(tmp_path / "o"), passes=("fp",), **quiet)
    assert first["models"] == []  # the quantized pass is left to another process
    second = run_sweep(cfg, str(tmp_path / "c"), str(tmp_path / "o"), passes=("q",), **quiet)
    whole = read_json(str(root / "out" / "models" / "A.json"))
    assert second["models"][0]["decomposition"] == pytest.approx(whole["decomposition"], rel=1e-9)
    with pytest.raises(ValueError, match="passes"):
        run_sweep(cfg, str(tmp_path / "c"), str(tmp_path / "o"), passes=("bogus",), **quiet)
