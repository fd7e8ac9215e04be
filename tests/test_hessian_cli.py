"""`tokenbounds hessian` end to end on a tiny model and token file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenbounds.cli import main
from tokenbounds.models.gpt import GPT, GPTConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """A 1-layer, d=8 model: one OpenMP thread avoids barrier waits on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def tiny(tmp_path):
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=32, context_length=16, n_layer=1, n_head=2, d_model=8)).save(str(tmp_path / "model"))
    tokens = np.random.default_rng(0).integers(0, 32, size=2000).astype(np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    return tmp_path


def test_cli_writes_json_and_png(tiny, capsys):
    out = tiny / "out"
    rc = main(["hessian", "--model", str(tiny / "model"), "--data", str(tiny / "train.bin"), "--batch-size", "2",
               "--seq-len", "8", "--num-matvecs", "6", "--num-probes", "2", "--lanczos-steps", "5",
               "--bits", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "hessian.json").read_text())
    assert res["num_parameters"] == sum(p.numel() for p in GPT.load(str(tiny / "model")).parameters())
    assert res["quadratic_path"] == "taylor"
    for key in ("trace_hutchinson", "trace_hutchpp", "slq_identity", "slq_sqrt_abs", "slq_sqrt_clamped"):
        e = res["estimates"][key]
        assert np.isfinite(e["value"]) and e["stderr"] >= 0 and e["num_matvecs"] > 0
    assert {r["layer"] for r in res["quip_table"]} >= {"blocks.0.mlp.0", "lm_head"}
    assert (out / "spectral_density.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_cli_passes_operator_flags_through(tiny):
    """--operator ggn --quadratic hvp reach the operator (the paths themselves: tests/test_hessian.py)."""
    out = tiny / "ggn"
    assert main(["hessian", "--model", str(tiny / "model"), "--data", str(tiny / "train.bin"), "--batch-size", "2",
                 "--seq-len", "8", "--num-matvecs", "6", "--num-probes", "2", "--lanczos-steps", "4", "--no-quip",
                 "--operator", "ggn", "--quadratic", "hvp", "--out", str(out)]) == 0
    res = json.loads((out / "hessian.json").read_text())
    assert res["operator"] == "ggn" and res["quadratic_path"] == "hvp"
    assert res["estimates"]["trace_hutchinson"]["value"] > 0  # the Gauss-Newton matrix is PSD


def test_cli_rejects_bad_inputs(tiny, capsys):
    base = ["hessian", "--model", str(tiny / "model"), "--data", str(tiny / "train.bin"), "--out", str(tiny / "o")]
    assert main(base + ["--seq-len", "64"]) == 2
    assert "context" in capsys.readouterr().err
    assert main(base + ["--dtype", "uint32", "--seq-len", "8"]) == 2
    assert "token id" in capsys.readouterr().err
    assert main(["hessian", "--model", str(tiny), "--data", str(tiny / "train.bin")]) == 2
    assert "config.json" in capsys.readouterr().err
