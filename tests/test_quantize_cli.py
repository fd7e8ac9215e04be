"""`tokenbounds quantize`: files written, text data through the model's tokenizer, errors, and a
run killed with SIGKILL that resumes to the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _tiny_models import random_tokens
from tokenbounds.cli import main
from tokenbounds.models.gpt import GPT, GPTConfig
from tokenbounds.quant.tbq import apply_tbq, load_tbq

VOCAB = 300


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt")
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=VOCAB, context_length=64, n_layer=2, n_head=2, d_model=32)).save(str(d / "model"))
    random_tokens(str(d / "train.bin"), 6000, vocab=VOCAB)
    return d


def _cli(args: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)  # the command sets the thread count of this process


def _args(d, out, *extra) -> list[str]:
    return ["quantize", "--model", str(d / "model"), "--data", str(d / "train.bin"), "--out", str(out),
            "--bits", "2", "--calibration-tokens", "1024", "--threads", "1", "--no-progress", *extra]


def test_quantize_writes_the_file_and_its_report(gpt_dir, tmp_path, capsys):
    out = tmp_path / "q.tbq"
    assert _cli(_args(gpt_dir, out, "--codebook", "uniform", "--method", "ldlq")) == 0
    printed = capsys.readouterr().out
    assert "bits/parameter" in printed and "report:" in printed
    tbq = load_tbq(str(out))
    assert tbq.coded_bits == 8 * os.path.getsize(out)
    assert tbq.quantizer["codebook"] == "uniform" and tbq.quantizer["calibration_tokens"] == 1024
    report = json.loads((tmp_path / "q.tbq.json").read_text())
    assert report["coded"]["coded_bits"] == tbq.coded_bits and report["calibration"]["windows"] == 16
    assert set(report["tensors"]) == {e["n"] for e in tbq.entries if e["k"] == "q"}
    assert not (tmp_path / "q.tbq.partial").exists()  # the resume state goes once the file is written
    model = GPT.load(str(gpt_dir / "model"))
    c = apply_tbq(model, str(out))
    assert c["detail"] == report["coded"]["detail"]


def test_text_data_goes_through_the_models_tokenizer(gpt_dir, tmp_path):
    from tokenbounds.eval.data import TINY_TEXT, tiny_documents, train_tokenizer

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=VOCAB, context_length=64, n_layer=1, n_head=2, d_model=16)).save(str(model_dir))
    train_tokenizer(tiny_documents(), VOCAB).save(str(model_dir / "tokenizer.json"))
    text = tmp_path / "train.txt"
    text.write_text(TINY_TEXT * 30)
    out = tmp_path / "t.tbq"
    assert _cli(["quantize", "--model", str(model_dir), "--data", str(text), "--out", str(out), "--bits", "3",
                 "--codebook", "uniform", "--calibration-tokens", "256", "--seq-len", "32", "--threads", "1",
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "t.tbq.json").read_text())
    assert report["data"][0]["format"] == "text" and report["calibration"]["tokens"] == 256


def test_bad_command_lines_give_clear_errors(gpt_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _cli(_args(gpt_dir, tmp_path / "x.tbq", "--codebook", "nf4"))
    with pytest.raises(SystemExit):
        _cli([a if a != "2" else "5" for a in _args(gpt_dir, tmp_path / "x.tbq")])
    capsys.readouterr()
    assert _cli(_args(gpt_dir, tmp_path / "x.tbq", "--bits", "8", "--codebook", "e8")) == 2
    assert "bits must be one of (2, 3, 4) for codebook='e8'" in capsys.readouterr().err
    assert _cli(_args(gpt_dir, tmp_path / "x.tbq", "--calibration-tokens", "100000")) == 2
    assert "fewer than the 100,000 calibration tokens" in capsys.readouterr().err
    assert _cli(_args(gpt_dir, tmp_path / "x.tbq", "--seq-len", "128")) == 2
    assert "exceeds the model's context of 64" in capsys.readouterr().err
    assert _cli(_args(gpt_dir, tmp_path / "nowhere" / "x.tbq")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.tbq").exists()


def test_a_killed_quantize_resumes_to_the_same_bytes(gpt_dir, tmp_path):
    ref = tmp_path / "ref.tbq"
    assert _cli(_args(gpt_dir, ref, "--sequential")) == 0
    out = tmp_path / "q.tbq"
    partial = tmp_path / "q.tbq.partial"
    env = {**os.environ, "TOKENBOUNDS_TEST_LAYER_SLEEP_S": "0.4", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tokenbounds.cli", *_args(gpt_dir, out, "--sequential")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if partial.exists() and len([p for p in os.listdir(partial) if p.endswith(".part")]) >= 3:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
        else:
            pytest.fail("no partial results appeared")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert not out.exists()
    done = len([p for p in os.listdir(partial) if p.endswith(".part")])
    assert 3 <= done < 10
    env.pop("TOKENBOUNDS_TEST_LAYER_SLEEP_S")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == ref.read_bytes()
    assert not partial.exists()
