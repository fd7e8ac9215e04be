"""End-to-end `tokenbounds evaluate`: fused = unfused statistics, outputs, resume after kill -9,
checkpoint mismatch / corruption detection, text data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from _tiny_models import VOCAB, random_tokens, tiny_hf  # noqa: E402
from tokenbounds import LossStats, smoothed_nll  # noqa: E402
from tokenbounds.cli import main  # noqa: E402
from tokenbounds.eval.evaluate import MultiTokens, draw_sample  # noqa: E402
from tokenbounds.eval.sample import sample_tokens  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(model, data, out, *extra, s=48):
    return ["evaluate", "--model", str(model), "--data", *map(str, data), "--sample-tokens", str(s),
            "--out", str(out), "--context-length", "24", "--batch-size", "8", "--checkpoint-every", "2",
            "--no-progress", "--threads", "1", *extra]


def _stats(out):
    with open(os.path.join(out, "stats.json")) as f:
        return json.load(f)


def test_sample_matches_sample_tokens(tmp_path):
    ids = random_tokens(str(tmp_path / "d.bin"), 3000)
    ours = draw_sample(MultiTokens([ids]), 500, context_length=20, seed=7, eot_id=0)
    ref = sample_tokens(ids, 500, context_length=20, seed=7, eot_id=0)
    np.testing.assert_array_equal(ours.positions, ref.positions)
    np.testing.assert_array_equal(ours.starts, ref.starts)
    # contexts never cross an EOT (except the EOT that starts the document) nor a file boundary
    two = MultiTokens([ids[:1500], ids[1500:]])
    smp = draw_sample(two, 2000, context_length=50, seed=1, eot_id=0)
    for p, s in zip(smp.positions[:300], smp.starts[:300], strict=True):
        ctx = np.concatenate([two.slice(int(s), int(p))])
        assert (ctx[1:] != 0).all()
        assert two.file_of(np.array([s]))[0] == two.file_of(np.array([p]))[0]
    assert smp.population == 2998


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptneox"])
def test_evaluate_fused_equals_unfused(tmp_path, family):
    model = tiny_hf(family, str(tmp_path / "m"))
    ids = random_tokens(str(tmp_path / "d.bin"), 2000)
    out = tmp_path / "run"
    assert main(_args(tmp_path / "m", [tmp_path / "d.bin"], out, "--bits-per-param", "8")) == 0
    doc = _stats(out)
    ev = doc["evaluation"]
    assert ev["s"] == 48 and ev["m"] == 1999 and ev["vocab_size"] == VOCAB
    assert ev["coded"]["coded_bits"] == 8 * ev["model"]["num_parameters"]
    # unfused: each sampled token scored from full logits of its own context
    smp = draw_sample(MultiTokens([ids]), 48, context_length=24, seed=0, eot_id=0)
    assert smp.digest() == ev["sample"]["positions_sha256"]
    ref = LossStats(vocab_size=VOCAB)
    with torch.no_grad():
        for p, s in zip(smp.positions, smp.starts, strict=True):
            x = torch.from_numpy(ids[s:p].astype(np.int64))[None]
            logits = model(input_ids=x).logits[0, -1:].float()
            ref.update(smoothed_nll(logits, torch.tensor([int(ids[p])])))
    ours = LossStats.from_state_dict(doc)
    assert ours.count == ref.count
    np.testing.assert_allclose(ours.mean, ref.mean, rtol=1e-5)
    np.testing.assert_allclose(ours.m2, ref.m2, rtol=1e-3, atol=1e-6)
    assert abs(ours.mean_nll_bits - ref.mean_nll_bits) < 1e-4
    assert ours.topk_correct == ref.topk_correct
    # outputs
    for name in ("bounds.json", "report.md", "evaluate.log", "bound_decomposition.png", "loss_histogram.png",
                 "loss_by_position.png"):
        assert (out / name).stat().st_size > 0, name
    bounds = json.loads((out / "bounds.json").read_text())
    assert "Freedman (union, Hoeffding)" in bounds["bounds"] and bounds["best"]["bound_bits"] > 0
    report = (out / "report.md").read_text()
    assert "coded size assumption" in report and "8 bits/parameter" in report
    assert sum(ev["histogram"]["counts"]) + ev["histogram"]["overflow"] == 48
    assert sum(ev["by_position"]["count"]) == 48
    # `tokenbounds bound` reads stats.json directly and gives the same best bound
    from tokenbounds.bounds import from_stats

    t = from_stats(str(out / "stats.json"), ev["coded"]["coded_bits"], ev["m"], topk=(1, 10))
    assert t.best["bound_bits"] == pytest.approx(bounds["best"]["bound_bits"], rel=1e-12)


def test_text_and_jsonl_data_with_local_tokenizer(tmp_path):
    tiny_hf("gpt2", str(tmp_path / "m"), tokenizer=True)
    (tmp_path / "a.txt").write_text("In the beginning was the word. The lazy dog sleeps in the sun.\n" * 20)
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"Part {i}. To be, or not to be, that is the question."}) + "\n")
    out = tmp_path / "run"
    assert main(_args(tmp_path / "m", [tmp_path / "a.txt", tmp_path / "b.jsonl"], out, "--no-plots", s=24)) == 0
    ev = _stats(out)["evaluation"]
    assert [d["format"] for d in ev["data"]] == ["text", "jsonl[text]"]
    cached = ev["data"][1]["tokenized_to"]
    toks = np.fromfile(cached, dtype="<u2")
    assert toks[0] == 0 and toks[-1] == 0 and (toks == 0).sum() == 31  # EOT d1 EOT ... d30 EOT
    assert ev["m"] == sum(d["n_tokens"] - 1 for d in ev["data"])
    assert "16 bits" in ev["coded"]["description"]


def test_quantized_bits_and_checkpoint_mismatch_and_corruption(tmp_path, capsys):
    tiny_hf("gpt2", str(tmp_path / "m"))
    random_tokens(str(tmp_path / "d.bin"), 1500)
    out = tmp_path / "run"
    base = _args(tmp_path / "m", [tmp_path / "d.bin"], out, "--no-plots", s=16)
    assert main([*base, "--bits", "6"]) == 0
    ev = _stats(out)["evaluation"]
    assert ev["coded"]["method"] == "quick_quant 6-bit"
    assert 0 < ev["coded"]["coded_bits"] < 6.5 * ev["model"]["num_parameters"]
    # same out dir, different config: refused with what differs
    capsys.readouterr()
    assert main([*base, "--bits", "6", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "sample.seed" in err and "--restart" in err
    # corrupt checkpoint: refused
    ck = out / "checkpoint.json"
    text = ck.read_text()
    doc = json.loads(text)
    next(iter(doc["payload"]["state"]["blocks"].values()))["loss_stats"]["count"] += 1  # hash not updated
    ck.write_text(json.dumps(doc))
    assert main([*base, "--bits", "6"]) == 2
    assert "corrupt" in capsys.readouterr().err
    ck.write_text(text[: len(text) // 2])
    assert main([*base, "--bits", "6"]) == 2
    assert "corrupt" in capsys.readouterr().err
    # --restart discards it and reproduces the first result exactly
    first = _stats(out)
    assert main([*base, "--bits", "6", "--restart"]) == 0
    again = _stats(out)
    assert {k: v for k, v in again.items() if k != "evaluation"} == {k: v for k, v in first.items() if k != "evaluation"}


def test_resume_after_sigkill_is_exact(tmp_path):
    tiny_hf("llama", str(tmp_path / "m"))
    random_tokens(str(tmp_path / "d.bin"), 3000)
    args = _args(tmp_path / "m", [tmp_path / "d.bin"], tmp_path / "killed", "--no-plots", s=96)
    args[args.index("--checkpoint-every") + 1] = "1"
    env = {**os.environ, "TOKENBOUNDS_TEST_BLOCK_SLEEP_S": "0.4", "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.Popen([sys.executable, "-m", "tokenbounds.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "killed" / "checkpoint.json"
    deadline = time.time() + 150  # generous: imports are slow on a loaded 2-core machine
    blocks = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if ck.exists():
                try:
                    blocks = len(json.loads(ck.read_text())["payload"]["state"]["blocks"])
                except ValueError:  # atomic replace: a reader never sees a torn file
                    raise
                if blocks >= 3:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 3 <= blocks < 12 and not (tmp_path / "killed" / "stats.json").exists()
    assert main(args) == 0  # resumes
    resumed = _stats(tmp_path / "killed")
    assert resumed["evaluation"]["run"]["tokens_this_run_rank0"] < 96
    clean_args = list(args)
    clean_args[clean_args.index("--out") + 1] = str(tmp_path / "clean")
    assert main(clean_args) == 0
    clean = _stats(tmp_path / "clean")
    assert resumed["evaluation"]["eval_state"] == clean["evaluation"]["eval_state"]
    assert {k: v for k, v in resumed.items() if k != "evaluation"} == {k: v for k, v in clean.items() if k != "evaluation"}
