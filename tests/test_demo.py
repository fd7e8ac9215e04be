"""`tokenbounds demo --tiny` end to end: outputs, honest accounting, cache reuse, --fresh."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
from tokenbounds import LossStats
from tokenbounds.bounds import from_stats, token_bound
from tokenbounds.cli import build_parser, main


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    for opt in ("--cache-dir", "--out", "--tiny", "--fresh", "--delta", "--no-progress", "--threads",
                "--compression"):
        assert opt in out
    parser = build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    for action in demo._actions:
        if action.dest != "help":
            assert action.help, f"option {action.option_strings} has no help"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    args = ["demo", "--tiny", "--cache-dir", str(root / "cache"), "--out", str(root / "out"), "--no-progress"]
    t0 = time.perf_counter()
    rc = main(args)
    elapsed = time.perf_counter() - t0
    assert rc == 0
    return root, args, elapsed, json.loads((root / "out" / "results.json").read_text())


def test_tiny_end_to_end_outputs(tiny_run):
    root, _, elapsed, res = tiny_run
    assert elapsed < 60
    out = root / "out"
    png = (out / "bounds.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (out / "report.md").read_text()
    assert md.count("\n| S |") >= 2 and "| L |" in md and "Honest accounting" in md
    models = res["models"]
    assert [m["name"] for m in models] == ["S", "M", "L"]
    sizes = [m["parameters"] for m in models]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    for m in models:
        from tokenbounds.models.gpt import GPT, GPTConfig

        gpt = GPT(GPTConfig(**m["config"]))
        assert m["parameters"] == sum(p.numel() for p in gpt.parameters())
        # every bound from_stats reports is there, each with its components summing to the total
        labels = set(m["bounds"]["bounds"])
        for lb in ("token (union, full pass)", "Freedman (union, full pass)",
                   "token, official formula (lotfi-code), full pass"):
            assert lb in labels
        assert any(lb.startswith("top-1 error") for lb in labels)
        assert m["primary"] == {"token": "token (union, full pass)", "freedman": "Freedman (union, full pass)"}
        t = m["bounds"]["bounds"]["token (union, full pass)"]
        assert t["bound_bits"] == pytest.approx(t["empirical_bits"] + t["complexity_bits"] + t["sampling_bits"])
        assert t["vacuous"] == (t["bound_bits"] >= math.log2(res["vocab_size"]))
        # statistics saved for recomputation: a full pass, every data point once, no sampling term
        doc = json.loads(open(m["stats_file"]).read())
        stats = LossStats.from_state_dict(doc)
        assert stats.count == res["train_tokens_m"] and doc["evaluation"]["scoring"]["full_pass"]
        assert all(r["sampling"] == 0 for r in m["rows"] if r["kind"] == "high-probability")
        assert m["training"]["steps"] >= 1 and m["training"]["tokens"] > 0
        q = m["quantization"]
        assert q["bits_per_parameter"] == pytest.approx(q["model_coded_bits"] / m["parameters"])
        assert q["gap_nll_bits"] == pytest.approx(
            m["losses"]["quantized_nll_bits"] - m["losses"]["unquantized_nll_bits"])
        # the trained model directory carries the tokenizer it was trained with
        assert os.path.exists(os.path.join(m["cache_directory"], "model", "tokenizer.json"))
    assert "no sampling term left to pay" in md


def test_choice_cost_is_applied(tiny_run):
    _, _, _, res = tiny_run
    cfg = res["config"]
    k = len(cfg["grid"])
    assert k >= 2
    for m in res["models"]:
        cl = m["code_length"]
        # C = coded model + tokenizer + architecture; extra = selection + log2 K
        assert cl["coded_bits"] == pytest.approx(cl["model_bits"] + cl["tokenizer_bits"] + cl["architecture_bits"])
        assert cl["extra_bits_detail"]["quantization_choice_bits"] == pytest.approx(math.log2(k))
        assert cl["extra_bits"] == pytest.approx(cfg["selection_bits"] + math.log2(k))
        q = m["quantization"]
        assert q["num_candidates"] == k and len(q["candidates"]) == k
        assert q["chosen"] == min(q["candidates"], key=lambda c: c["predicted_bound_bits"])["label"]
        # the reported bounds are what from_stats gives with those bits, and paying raises them
        table = from_stats(m["stats_file"], cl["coded_bits"], res["train_tokens_m"], delta=cfg["delta"],
                           extra_bits=cl["extra_bits"], vocab_size=res["vocab_size"], full_pass=True)
        rep = m["bounds"]["bounds"]["token (union, full pass)"]["bound_bits"]
        assert table.bounds["token (union, full pass)"].bound_bits == pytest.approx(rep, rel=1e-12)
        st = LossStats.from_state_dict(json.loads(open(m["stats_file"]).read()))
        unpaid = token_bound(st.mean_bits, coded_bits=cl["coded_bits"], train_tokens=res["train_tokens_m"],
                             sample_tokens=None, vocab_size=res["vocab_size"], delta=cfg["delta"],
                             extra_bits=cfg["selection_bits"])
        assert unpaid.bound_bits < rep
        # the selection sample is a window-unit sample with a seed used nowhere else
        sel = q["selection_sample"]
        assert sel["draws"] == cfg["select_tokens"] and sel["seed"] == cfg["select_seed"]
        other_seeds = {cfg["seed"], cfg["calibration_seed"]} | {c["seed"] for c in q["candidates"]}
        assert cfg["select_seed"] not in other_seeds


def test_bound_is_on_the_decoded_model(tiny_run):
    """Decode the chosen model's message and score it with `tokenbounds evaluate` in a full pass
    of the same windows: the same statistics as the demo's (one scoring engine)."""
    import torch
    from tokenbounds.cli import main as cli
    from tokenbounds.models.gpt import GPT
    from tokenbounds.quant import QuantizedModel

    root, _, _, res = tiny_run
    m = res["models"][-1]
    qm = torch.load(m["quantization"]["file"], weights_only=False)
    decoded = QuantizedModel.decode(qm.encode())
    model = decoded.dequantized_model(GPT.load(os.path.join(m["cache_directory"], "model")))
    mdir = root / "decoded"
    model.save(str(mdir))
    corpus = res["corpus"]
    sc = res["scoring"]
    assert cli(["evaluate", "--model", str(mdir), "--data", os.path.join(corpus["directory"], "tokens.bin"),
                "--out", str(root / "ev"), "--window", str(sc["window"]), "--stride", str(sc["stride"]),
                "--batch-size", str(res["config"]["eval_batch_size"]), "--no-progress", "--no-plots",
                "--coded-bits", str(m["code_length"]["coded_bits"]), "--threads", "1"]) == 0
    ours = LossStats.from_state_dict(json.loads((root / "ev" / "stats.json").read_text()))
    saved = LossStats.from_state_dict(json.loads(open(m["stats_file"]).read()))
    assert ours.count == saved.count == res["train_tokens_m"]
    for a in saved.alphas:
        assert ours.mean_bits[a] == pytest.approx(saved.mean_bits[a], rel=1e-9)


def test_rerun_reuses_cache(tiny_run, capsys):
    root, args, first_elapsed, res = tiny_run
    capsys.readouterr()
    cached = sorted(os.path.join(d, f) for d, _, fs in os.walk(root / "cache" / "pipeline") for f in fs)
    mtimes = {p: os.path.getmtime(p) for p in cached}
    t0 = time.perf_counter()
    assert main(args) == 0
    elapsed = time.perf_counter() - t0
    printed = capsys.readouterr().out
    assert printed.count("reusing the trained model") == 3 and "): training" not in printed
    for p, t in mtimes.items():
        if os.path.basename(p).startswith(("quant-", "train.json", "model.pt")):
            assert os.path.getmtime(p) == t, f"{p} was rewritten"
    res2 = json.loads((root / "out" / "results.json").read_text())
    for a, b in zip(res["models"], res2["models"], strict=True):
        assert a["bounds"]["best"]["bound_bits"] == b["bounds"]["best"]["bound_bits"]
    assert elapsed < max(5.0, first_elapsed)
    # another delta: the quantized candidates are reused, only the bounds (and the choice) change
    quant = {p: t for p, t in mtimes.items() if os.path.basename(os.path.dirname(p)).startswith("quant-")}
    assert len(quant) == 2 * 3 * len(res["config"]["grid"])
    assert main([*args, "--delta", "0.1"]) == 0
    assert all(os.path.getmtime(p) == t for p, t in quant.items())
    res3 = json.loads((root / "out" / "results.json").read_text())
    for a, b in zip(res["models"], res3["models"], strict=True):
        assert b["bounds"]["best"]["bound_bits"] < a["bounds"]["best"]["bound_bits"]


def test_fresh_retrains(tiny_run, capsys):
    root, args, _, res = tiny_run
    capsys.readouterr()
    assert main([*args, "--fresh"]) == 0
    printed = capsys.readouterr().out
    assert "reusing the trained model" not in printed and printed.count("): training") == 3
    res2 = json.loads((root / "out" / "results.json").read_text())
    # step-budgeted training is reproducible: retraining gives the same models and bounds
    for a, b in zip(res["models"], res2["models"], strict=True):
        assert b["bounds"]["best"]["bound_bits"] == pytest.approx(a["bounds"]["best"]["bound_bits"], rel=1e-9)


def test_bad_arguments(tmp_path, capsys):
    base = ["demo", "--tiny", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--delta", "1.5"]) == 2
    assert "--delta" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the demo always makes full passes now
        main([*base, "--sample-tokens", "10"])
    # bad compression specs fail at once, before any corpus or training, naming what is wrong
    for bad, msg in [("qlora:rank=2", "unknown compression 'qlora'"), ("lora", "needs the option rank="),
                     ("kron,,monarch", "empty spec"), ("kron,kron", "given twice"),
                     ("lora:rank=999", "does not fit model S"), ("sublora:rank=2,d=99999999", "exceeds")]:
        assert main([*base, "--compression", bad]) == 2
        out = capsys.readouterr().out
        assert "error:" in out and msg in out, (bad, out)
    assert not os.path.exists(tmp_path / "c" / "pipeline")  # nothing was trained


def test_compression_candidate_end_to_end(tiny_run, tmp_path, capsys):
    """`--compression` joins the paid grid: K, the log2 K paid, the report's winner table. (On the
    cache of `tiny_run`, so only the compressed candidates are trained; the last test of the file,
    since it adds candidates to that cache.)"""
    root, _, _, dense = tiny_run
    capsys.readouterr()
    args = ["demo", "--tiny", "--cache-dir", str(root / "cache"), "--out", str(tmp_path / "o"), "--no-progress",
            "--compression", "sublora:rank=2,d=100"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing the trained model") == 3 and printed.count("training from its seeded init") == 3
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["config"]["compression"] == ["sublora:rank=2,d=100"]  # one spec, its options kept together
    k = 2 * len(res["config"]["grid"])
    assert f"{k} candidates" in printed
    for m in res["models"]:
        assert m["quantization"]["num_candidates"] == k
        assert m["code_length"]["extra_bits_detail"]["quantization_choice_bits"] == pytest.approx(math.log2(k))
        assert m["compression"]["winner"] in ("dense", "sublora:rank=2,d=100")
    for a, b in zip(dense["models"], res["models"], strict=True):  # the larger K is paid by every candidate
        before = {c["label"]: c["predicted_bound_bits"] for c in a["quantization"]["candidates"]}
        after = {c["label"]: c["predicted_bound_bits"] for c in b["quantization"]["candidates"]}
        assert all(after[lb] > v for lb, v in before.items())
    md = (tmp_path / "o" / "report.md").read_text()
    assert "which parametrization wins" in md and md.count(" **wins** |") == len(res["models"])



def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "tokenbounds.cli", "demo", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--cache-dir" in proc.stdout
