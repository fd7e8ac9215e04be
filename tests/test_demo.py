"""`tokenbounds demo --tiny` end to end (seconds, no corpus install needed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
from tokenbounds import LossStats
from tokenbounds.cli import build_parser, main


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    for opt in ("--cache-dir", "--out", "--tiny", "--corpus", "--vocab-size", "--steps", "--sample-tokens",
                "--bits", "--delta", "--selection-bits", "--fresh", "--seed", "--sample-seed"):
        assert opt in out
    parser = build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    for action in demo._actions:
        if action.dest != "help":
            assert action.help, f"option {action.option_strings} has no help"


def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "run" / "result.json"
    args = ["demo", "--tiny", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]
    t0 = time.perf_counter()
    assert main(args) == 0
    elapsed = time.perf_counter() - t0
    assert elapsed < 60
    printed = capsys.readouterr().out
    assert "token-level bound" in printed and str(out) in printed
    res = json.loads(out.read_text())
    b = res["bound"]
    # the bound is the sum of its parts, evaluated on the quantized model
    assert b["bound_bits"] == pytest.approx(b["empirical_bits"] + b["complexity_bits"] + b["sampling_bits"])
    assert b["empirical_bits"] == pytest.approx(res["empirical_bits_quantized"][str(b["alpha"])])
    v = res["inputs"]["vocab_size"]
    assert res["uniform_baseline_bits"] == pytest.approx(math.log2(v))
    assert res["vacuous"] == (b["bound_bits"] >= math.log2(v))
    cl = res["code_length"]
    assert cl["coded_bits"] == pytest.approx(cl["model"]["total_bits"] + cl["tokenizer_bits"])
    assert res["inputs"]["train_tokens_m"] == res["corpus"]["n_tokens"] - 1
    stats = LossStats.from_json((tmp_path / "run" / "stats.json").read_text())
    assert stats.count == res["inputs"]["sample_tokens_s"] == res["sample"]["num_samples"]

    # a rerun reuses the corpus and the trained model, and gives the same result
    assert main(args) == 0
    assert "reusing the trained model" in capsys.readouterr().out
    res2 = json.loads(out.read_text())
    assert res2["bound"]["bound_bits"] == res["bound"]["bound_bits"]


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "tokenbounds.cli", "demo", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--cache-dir" in proc.stdout
