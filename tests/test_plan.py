"""`tokenbounds plan`: roofline estimate sanity (scaling laws of the model, not absolute numbers)."""

from __future__ import annotations

import json

import pytest
from tokenbounds.cli import main
from tokenbounds.eval.plan import GPUS, estimate, guess_shape


def test_shape_guess_llama70b_like():
    d, layers = guess_shape(70e9)
    assert 7000 <= d <= 10000 and 60 <= layers <= 100
    assert 12 * layers * d * d == pytest.approx(70e9, rel=0.1)


def test_estimate_scaling_and_fit():
    p = estimate(70e9, 32000, 1e6, gpu="h100")
    assert p.gpus_to_fit == 4  # 140 GB of bf16 weights need > 2 x 72 GB usable: TP degree 4
    assert p.memory_per_gpu_bytes <= 0.9 * GPUS["h100"]["memory"]
    assert estimate(70e9, 32000, 1e6, gpu="h200").gpus_to_fit == 2
    assert estimate(7e9, 32000, 1e6, gpu="h100").gpus_to_fit == 1
    # time is linear in the sample size; more replicas divide it
    p2 = estimate(70e9, 32000, 2e6, gpu="h100")
    assert p2.seconds_on_fit == pytest.approx(2 * p.seconds_on_fit)
    assert p.seconds_by_gpus[64] == pytest.approx(p.seconds_on_fit / (64 // p.gpus_to_fit))
    # FLOPs ~ 2 N c dominate; attention adds the c^2 term
    assert p.flops_per_token == pytest.approx(2 * 70e9 * 4096, rel=0.15)
    short = estimate(70e9, 32000, 1e6, gpu="h100", context=512)
    assert short.flops_per_token < p.flops_per_token / 7
    # the fused head never holds B x c x V logits
    assert p.fused_head_bytes < p.naive_logits_bytes / 1000
    # faster hardware is faster, CPU much slower
    assert estimate(7e9, 32000, 1e6, gpu="a100").seconds_on_fit > estimate(7e9, 32000, 1e6, gpu="h100").seconds_on_fit
    assert estimate(7e9, 32000, 1e6, gpu="cpu").seconds_on_fit > 100 * estimate(7e9, 32000, 1e6).seconds_on_fit
    assert any("ESTIMATE" in a for a in p.assumptions)


def test_plan_cli(capsys):
    assert main(["plan", "--params", "70e9", "--vocab", "32000", "--sample-tokens", "1e6", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE" in out and "GPUs to hold it:     4" in out and "l40s" in out
    assert main(["plan", "--params", "1e8", "--vocab", "50257", "--sample-tokens", "1e5", "--gpu", "cpu",
                 "--context", "1024", "--dtype", "fp32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpu"] == "cpu" and d["gpus_to_fit"] == 1
    assert main(["plan", "--params", "1e8", "--vocab", "100", "--sample-tokens", "1", "--gpu", "tpu"]) == 2
    assert "unknown --gpu" in capsys.readouterr().err


def test_plan_cli_defaults_to_the_evaluate_window_rule(capsys):
    args = ["plan", "--params", "7e9", "--vocab", "32000", "--sample-tokens", "1e6", "--context", "2048", "--json"]
    secs = {}
    for extra in ([], ["--stride", "1024"], ["--stride", "256"], ["--per-token-contexts"]):
        assert main(args + extra) == 0
        secs[" ".join(extra)] = json.loads(capsys.readouterr().out)["seconds_on_fit"]
    assert secs[""] == secs["--stride 1024"]  # the default stride is T / 2, as in evaluate
    assert secs["--per-token-contexts"] > 10 * secs[""] and secs["--stride 256"] > secs[""]
    assert main(args + ["--stride", "4096"]) == 2 and "--stride" in capsys.readouterr().err
    assert main(args + ["--stride", "8", "--per-token-contexts"]) == 2
