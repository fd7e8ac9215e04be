"""End-to-end `tokenbounds evaluate`: statistics equal a per-target reference in every mode,
outputs and the honest complexity term, resume after kill -9, checkpoint mismatch / corruption,
text data, and every bad input."""

from __future__ import annotations

import json
import math
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
from tokenbounds import LossStats, UnitStats, smoothed_nll  # noqa: E402
from tokenbounds.cli import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(model, data, out, *extra):
    return ["evaluate", "--model", str(model), "--data", *map(str, data), "--out", str(out), "--window", "16",
            "--batch-size", "8", "--checkpoint-every", "2", "--no-progress", "--threads", "1", *extra]


def _stats(out):
    with open(os.path.join(out, "stats.json")) as f:
        return json.load(f)


def _start(x, k, mode, T, S, reset, eot=0):
    """Target k's context start, restated from the rule (spec/bounds.md section 3b)."""
    if mode == "windows":
        last = min(((k - 1) // S + 1) * S, len(x) - 1)
        start = max(0, last - T)
    else:
        start = max(0, k - T)
    if reset:
        e = np.flatnonzero(np.asarray(x[:k]) == eot)
        if e.size:
            start = max(start, int(e[-1]))
    return start


def _reference(model, x, targets, mode, T, S, reset, prefix):
    """Per-target losses from the model's own full logits of that target's context."""
    out = []
    with torch.no_grad():
        for k in targets:
            s = _start(x, int(k), mode, T, S, reset)
            ctx = ([prefix] if prefix is not None else []) + [int(t) for t in x[s:k]]
            logits = model(input_ids=torch.tensor([ctx])).logits[0, -1:].float()
            out.append(smoothed_nll(logits, torch.tensor([int(x[k])])))
    return out


def _stats_of(losses, counts=None):
    st = LossStats(vocab_size=VOCAB)
    for i, tl in enumerate(losses):
        for _ in range(1 if counts is None else int(counts[i])):
            st.update(tl)
    return st


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptneox"])
def test_full_pass_windows_equal_reference(tmp_path, family):
    model = tiny_hf(family, str(tmp_path / "m"))
    ids = random_tokens(str(tmp_path / "d.bin"), 300)
    out = tmp_path / "run"
    assert main(_args(tmp_path / "m", [tmp_path / "d.bin"], out, "--stride", "6")) == 0
    doc = _stats(out)
    ev = doc["evaluation"]
    sc = ev["scoring"]
    assert doc["format"] == "tokenbounds.LossStats/1" and ev["format"] == "tokenbounds.evaluate/2"
    assert sc["mode"] == "windows" and sc["full_pass"] and sc["window"] == 16 and sc["stride"] == 6
    assert sc["prefix_token"] == 0 and sc["units"] == math.ceil(299 / 6) and sc["draws"] is None
    assert "unit_stats" not in doc and ev["m"] == 299 == doc["count"]
    ref = _stats_of(_reference(model, ids, range(1, 300), "windows", 16, 6, False, 0))
    ours = LossStats.from_state_dict(doc)
    np.testing.assert_allclose(ours.mean, ref.mean, rtol=1e-5)
    np.testing.assert_allclose(ours.m2, ref.m2, rtol=1e-3, atol=1e-6)
    assert abs(ours.mean_nll_bits - ref.mean_nll_bits) < 1e-4
    assert sum(abs(ours.topk_correct[k] - ref.topk_correct[k]) for k in ours.topk_correct) <= 3
    # a full pass: no sampling term, per-context-length bounds with each bucket's population
    bounds = json.loads((out / "bounds.json").read_text())
    assert bounds["best"]["valid"] and bounds["inputs"]["s"] is None
    assert all(b["sampling_bits"] == 0 for k, b in bounds["bounds"].items() if "sampling_bits" in b)
    cb = ev["context_length_bounds"]
    assert sum(r["m_b"] for r in cb) == sum(n for n in ev["by_context_length"]["count"] if n >= 2)
    assert all(r["delta_each"] == pytest.approx(0.05 / (2 * len(cb))) for r in cb)
    for name in ("report.md", "evaluate.log", "bound_decomposition.png", "loss_histogram.png", "loss_by_position.png",
                 "configurations.jsonl"):
        assert (out / name).stat().st_size > 0, name
    # `tokenbounds bound` reads stats.json directly and gives the same best bound
    from tokenbounds.bounds import from_stats

    t = from_stats(str(out / "stats.json"), ev["coded"]["coded_bits"], ev["m"], topk=(1, 10), full_pass=True)
    assert t.best["bound_bits"] == pytest.approx(bounds["best"]["bound_bits"], rel=1e-12)


def test_sampled_window_units_and_per_token_contexts_equal_reference(tmp_path):
    model = tiny_hf("llama", str(tmp_path / "m"))
    ids = random_tokens(str(tmp_path / "d.bin"), 700)
    # window units: 40 draws, each unit scored once, counted per draw
    out = tmp_path / "units"
    assert main(_args(tmp_path / "m", [tmp_path / "d.bin"], out, "--sample-tokens", "40", "--seed", "3",
                      "--reset-at-eot", "--no-plots")) == 0
    doc = _stats(out)
    sc = doc["evaluation"]["scoring"]
    assert sc["draws"] == 40 and not sc["full_pass"] and sc["reset_at_eot"]
    pts = np.random.default_rng(3).integers(0, 699, 40)
    unit_ids, counts = np.unique(pts // 8, return_counts=True)  # T = 16, S = 8, one file: unit = (k - 1) // 8
    assert sc["units_scored"] == unit_ids.size
    per_unit = [_reference(model, ids, range(u * 8 + 1, min(u * 8 + 8, 699) + 1), "windows", 16, 8, True, 0)
                for u in unit_ids]
    ref = _stats_of([t for losses in per_unit for t in losses],
                    [c for losses, c in zip(per_unit, counts, strict=True) for _ in losses])
    ours = LossStats.from_state_dict(doc)
    assert ours.count == ref.count == sc["tokens_with_multiplicity"]
    np.testing.assert_allclose(ours.mean, ref.mean, rtol=1e-5)
    units = UnitStats.from_state_dict(doc["unit_stats"])
    assert units.draws == 40 and units.tokens == ref.count
    y = np.array([np.mean([float(t.nll_bits[0, 0]) for t in losses]) for losses in per_unit])
    assert units.mean_bits[units.alphas[0]] == pytest.approx(float((y * counts).sum() / 40), rel=1e-5)
    ev = doc["evaluation"]
    assert ev["context_length_bounds"] is None and "no bound" in ev["context_length_bounds_note"]
    # the bounds take the s draws as the sample, never the s x S tokens of the drawn units
    bounds = json.loads((out / "bounds.json").read_text())
    assert bounds["inputs"]["s"] == 40 and bounds["inputs"]["unit_tokens"] == ref.count
    # per-token contexts: the paper's rule, one target per context
    out = tmp_path / "per-token"
    assert main(_args(tmp_path / "m", [tmp_path / "d.bin"], out, "--per-token-contexts", "--sample-tokens", "30",
                      "--prefix-token", "none", "--no-plots")) == 0
    doc = _stats(out)
    sc = doc["evaluation"]["scoring"]
    assert sc["mode"] == "per-token" and sc["stride"] == 1 and sc["prefix_token"] is None and "unit_stats" not in doc
    pts = np.random.default_rng(0).integers(0, 699, 30)
    ref = _stats_of(_reference(model, ids, pts + 1, "per-token", 16, 1, False, None))
    ours = LossStats.from_state_dict(doc)
    assert ours.count == 30
    np.testing.assert_allclose(ours.mean, ref.mean, rtol=1e-5)
    assert json.loads((out / "bounds.json").read_text())["best"]["valid"]


def test_coded_size_defaults_to_the_evaluated_dtype(tmp_path):
    tiny_hf("gpt2", str(tmp_path / "m"))
    random_tokens(str(tmp_path / "d.bin"), 300)
    n = None
    for dtype, bits in (("float32", 32), ("bfloat16", 16)):
        out = tmp_path / dtype
        assert main(_args(tmp_path / "m", [tmp_path / "d.bin"], out, "--dtype", dtype, "--no-plots")) == 0
        ev = _stats(out)["evaluation"]
        n = ev["model"]["num_parameters"]
        parts = ev["coded"]["parts"]
        assert parts["model"] == bits * n and parts["config"] > 0 and "tokenizer" not in parts
        assert ev["coded"]["coded_bits"] == pytest.approx(bits * n + parts["config"])
        assert f"{dtype} weights" == ev["coded"]["method"]
    out = tmp_path / "bpp"
    assert main(_args(tmp_path / "m", [tmp_path / "d.bin"], out, "--bits-per-param", "8", "--no-plots")) == 0
    assert _stats(out)["evaluation"]["coded"]["parts"]["model"] == 8 * n


def test_gpt_directory_counts_its_tokenizer(tmp_path):
    from tokenbounds.eval.data import tiny_documents, tokenizer_description_bits, train_tokenizer
    from tokenbounds.models.gpt import GPT, GPTConfig

    tok = train_tokenizer(tiny_documents(), 300)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=300, context_length=16, n_layer=1, n_head=2, d_model=8)).save(str(tmp_path / "g"))
    tok.save(str(tmp_path / "g" / "tokenizer.json"))
    (tmp_path / "t.txt").write_text("In the beginning was the word. The lazy dog sleeps in the sun.\n" * 10)
    out = tmp_path / "run"
    assert main(_args(tmp_path / "g", [tmp_path / "t.txt"], out, "--window", "12", "--no-plots")) == 0
    ev = _stats(out)["evaluation"]
    assert ev["scoring"]["prefix_token"] is None  # a tokenizers BPE defines no BOS
    assert ev["coded"]["parts"]["tokenizer"] == tokenizer_description_bits(tok)
    assert "trained on the corpus" in ev["coded"]["description"]


def test_text_and_jsonl_data_with_local_tokenizer(tmp_path):
    tiny_hf("gpt2", str(tmp_path / "m"), tokenizer=True)
    (tmp_path / "a.txt").write_text("In the beginning was the word. The lazy dog sleeps in the sun.\n" * 20)
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"Part {i}. To be, or not to be, that is the question."}) + "\n")
    out = tmp_path / "run"
    assert main(_args(tmp_path / "m", [tmp_path / "a.txt", tmp_path / "b.jsonl"], out, "--no-plots")) == 0
    doc = _stats(out)
    ev = doc["evaluation"]
    assert [d["format"] for d in ev["data"]] == ["text", "jsonl[text]"]
    toks = np.fromfile(ev["data"][1]["tokenized_to"], dtype="<u2")
    assert toks[0] == 0 and toks[-1] == 0 and (toks == 0).sum() == 31  # EOT d1 EOT ... d30 EOT
    assert ev["m"] == sum(d["n_tokens"] - 1 for d in ev["data"]) == doc["count"]  # multi-file full pass
    assert ev["scoring"]["prefix_token"] == 0 and "BOS" in ev["scoring"]["prefix_token_source"]


def test_quantized_bits_and_checkpoint_mismatch_and_corruption(tmp_path, capsys):
    tiny_hf("gpt2", str(tmp_path / "m"))
    random_tokens(str(tmp_path / "d.bin"), 1500)
    out = tmp_path / "run"
    base = _args(tmp_path / "m", [tmp_path / "d.bin"], out, "--no-plots", "--sample-tokens", "60")
    assert main([*base, "--bits", "2"]) == 0
    ev = _stats(out)["evaluation"]
    assert ev["coded"]["method"] == "tbq 2-bit e8 ldlq"
    assert 0 < ev["coded"]["coded_bits"] < 6.5 * ev["model"]["num_parameters"]
    # same out dir, different config: refused with what differs
    capsys.readouterr()
    assert main([*base, "--bits", "2", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "plan.seed" in err and "--restart" in err
    # corrupt block: refused
    ck = out / "checkpoint" / "block-00000000.json"
    text = ck.read_text()
    doc = json.loads(text)
    doc["payload"]["state"]["loss_stats"]["count"] += 1  # hash not updated
    ck.write_text(json.dumps(doc))
    assert main([*base, "--bits", "2"]) == 2
    assert "corrupt" in capsys.readouterr().err
    ck.write_text(text[: len(text) // 2])
    assert main([*base, "--bits", "2"]) == 2
    assert "corrupt" in capsys.readouterr().err
    # --restart discards it and reproduces the first result exactly
    first = _stats(out)
    assert main([*base, "--bits", "2", "--restart"]) == 0
    again = _stats(out)
    assert {k: v for k, v in again.items() if k != "evaluation"} == {k: v for k, v in first.items() if k != "evaluation"}
    # every configuration this directory has seen is recorded; the report says how to pay for them
    assert main([*base, "--bits", "2", "--seed", "3", "--restart"]) == 0
    ev = _stats(out)["evaluation"]
    assert ev["configuration"]["configurations_recorded"] == 2
    report = (out / "report.md").read_text()
    assert "fixed before seeing the sample" in report and "--extra-bits log2(K)" in report and "1.000 bits" in report


def _quantize(model_dir, data, out, *extra) -> None:
    threads = torch.get_num_threads()
    try:
        assert main(["quantize", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--bits", "2",
                     "--threads", "1", "--no-progress", *extra]) == 0
    finally:
        torch.set_num_threads(threads)  # the command sets this process's thread count


def _without_evaluation(doc):
    return {k: v for k, v in doc.items() if k != "evaluation"}


@pytest.fixture(scope="module")
def quantized_llama(tmp_path_factory):
    """A tiny Llama, 600 tokens of data and its `tokenbounds quantize` file (2-bit e8 ldlq)."""
    d = tmp_path_factory.mktemp("qllama")
    tiny_hf("llama", str(d / "m"))
    random_tokens(str(d / "d.bin"), 600)
    _quantize(d / "m", d / "d.bin", d / "q.tbq", "--calibration-tokens", "512")
    return d


def test_quantized_evaluates_exactly_the_decoded_state_dict(quantized_llama, tmp_path):
    from tokenbounds.quant import load_tbq
    from transformers import LlamaForCausalLM

    d = quantized_llama
    tbq = load_tbq(str(d / "q.tbq"))
    assert main(_args(d / "m", [d / "d.bin"], tmp_path / "q", "--quantized", str(d / "q.tbq"), "--no-plots")) == 0
    # the same weights by hand: decode the state dict, save it as a plain checkpoint, evaluate that
    model = LlamaForCausalLM.from_pretrained(str(d / "m"))
    model.load_state_dict(tbq.state_dict())
    model.save_pretrained(str(tmp_path / "decoded"))
    assert main(_args(tmp_path / "decoded", [d / "d.bin"], tmp_path / "d", "--no-plots")) == 0
    quantized, decoded = _stats(tmp_path / "q"), _stats(tmp_path / "d")
    assert _without_evaluation(quantized) == _without_evaluation(decoded)  # bit-identical statistics
    # negative control: the original weights give other statistics (--quantized did replace them)
    assert main(_args(d / "m", [d / "d.bin"], tmp_path / "fp", "--no-plots")) == 0
    assert _stats(tmp_path / "fp")["mean"] != quantized["mean"]
    coded = quantized["evaluation"]["coded"]
    assert coded["method"] == "tbq 2-bit e8 ldlq"
    assert coded["coded_bits"] == coded["parts"]["model"] == 8 * os.path.getsize(d / "q.tbq") == tbq.coded_bits
    parts = coded["parts"]["tbq"]
    assert set(coded["parts"]) == {"model", "tbq"}  # an HF tokenizer is not counted; the header holds the config
    assert sum(parts[k] for k in ("codes_bits", "scales_bits", "side_bits", "unquantized_bits", "header_bits")) \
        == coded["coded_bits"]
    assert parts["sha256"] == tbq.sha256 and parts["quantizer"]["calibration_tokens"] == 512
    report = (tmp_path / "q" / "report.md").read_text()
    for word in ("range-coded codes", "scales", "stream models", "float16 tensors", "header", "q.tbq"):
        assert word in coded["description"] and word in report, word


def test_bits_runs_the_tbq_quantizer_here(tmp_path, capsys):
    from tokenbounds.quant import load_tbq

    tiny_hf("gpt2", str(tmp_path / "m"))  # tied embedding and head
    random_tokens(str(tmp_path / "d.bin"), 600)
    out = tmp_path / "bits"
    assert main(_args(tmp_path / "m", [tmp_path / "d.bin"], out, "--bits", "2", "--no-plots")) == 0
    ev = _stats(out)["evaluation"]
    written = out / "quantized.tbq"
    tbq = load_tbq(str(written))
    assert ev["coded"]["method"] == "tbq 2-bit e8 ldlq" and ev["model"]["quantized_here_bits"] == 2
    assert ev["coded"]["coded_bits"] == 8 * os.path.getsize(written) == tbq.coded_bits
    assert ev["coded"]["parts"]["tbq"]["sha256"] == tbq.sha256 and "quantized here" in ev["coded"]["description"]
    # one quantizer: `tokenbounds quantize` with its defaults on the same whole windows writes the same bytes
    q = tbq.quantizer
    assert q["calibration_tokens"] == 600 // 64 * 64 and q["seed"] == 0 and q["incoherence"]
    _quantize(tmp_path / "m", tmp_path / "d.bin", tmp_path / "cli.tbq", "--calibration-tokens", "576")
    assert (tmp_path / "cli.tbq").read_bytes() == written.read_bytes()
    # and --bits evaluates what --quantized of that file evaluates
    assert main(_args(tmp_path / "m", [tmp_path / "d.bin"], tmp_path / "file", "--quantized", str(written),
                      "--no-plots")) == 0
    assert _without_evaluation(_stats(tmp_path / "file")) == _without_evaluation(_stats(out))
    # a rerun in the same directory decodes the kept resume state to the same file (no new quantization)
    assert main(_args(tmp_path / "m", [tmp_path / "d.bin"], out, "--bits", "2", "--no-plots")) == 0
    assert load_tbq(str(written)).sha256 == tbq.sha256
    # other settings in that directory: refused, naming what differs (the file is not silently replaced)
    capsys.readouterr()
    assert main(_args(tmp_path / "m", [tmp_path / "d.bin"], out, "--bits", "3", "--no-plots")) == 2
    err = capsys.readouterr().err
    assert "another quantize run" in err and "settings.bits: 2 then, 3 now" in err and "--restart" in err
    assert load_tbq(str(written)).sha256 == tbq.sha256
    out = tmp_path / "uniform"
    assert main(_args(tmp_path / "m", [tmp_path / "d.bin"], out, "--bits", "3", "--codebook", "uniform",
                      "--method", "rtn", "--no-plots")) == 0
    assert _stats(out)["evaluation"]["coded"]["method"] == "tbq 3-bit uniform rtn"


def test_bad_quantized_inputs_fail_before_scoring(quantized_llama, tmp_path, capsys):
    from tokenbounds.eval.evaluate import EvalOptions, check_options

    d = quantized_llama
    data = (d / "q.tbq").read_bytes()
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF
    (tmp_path / "corrupt.tbq").write_bytes(bytes(corrupt))
    (tmp_path / "short.tbq").write_bytes(data[: len(data) - 100])
    tiny_hf("gpt2", str(tmp_path / "gpt2"))
    cases = [
        (d / "m", ["--quantized", str(tmp_path / "corrupt.tbq")], "corrupt"),
        (d / "m", ["--quantized", str(tmp_path / "short.tbq")], "truncated"),
        (d / "m", ["--quantized", str(tmp_path / "none.tbq")], "does not exist"),
        (tmp_path / "gpt2", ["--quantized", str(d / "q.tbq")], "another architecture"),
        (d / "m", ["--quantized", str(d / "q.tbq"), "--dtype", "bfloat16"], "--dtype float32"),
        (d / "m", ["--bits", "8"], "bits must be one of (2, 3, 4) for codebook='e8'"),
        (d / "m", ["--codebook", "uniform"], "give --bits b too"),
        (d / "m", ["--quantized", str(d / "q.tbq"), "--method", "rtn"], "give --bits b too"),
    ]
    capsys.readouterr()
    for i, (model, extra, message) in enumerate(cases):
        out = tmp_path / f"o{i}"
        assert main(_args(model, [d / "d.bin"], out, "--no-plots", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
        assert not (out / "checkpoint").exists() and not (out / "stats.json").exists()
    with pytest.raises(SystemExit):  # argparse: mutually exclusive
        main(_args(d / "m", [d / "d.bin"], tmp_path / "x", "--bits", "2", "--quantized", str(d / "q.tbq")))
    with pytest.raises(ValueError, match="at most one of --bits, --quantized"):
        check_options(EvalOptions(model="m", data=["d"], out="o", bits=2, quantized="q.tbq"))


def test_resume_after_sigkill_is_exact_in_windows_mode(tmp_path):
    tiny_hf("llama", str(tmp_path / "m"))
    random_tokens(str(tmp_path / "d.bin"), 3000)
    args = _args(tmp_path / "m", [tmp_path / "d.bin"], tmp_path / "killed", "--no-plots", "--sample-tokens", "400",
                 "--window", "8")
    args[args.index("--checkpoint-every") + 1] = "1"
    args[args.index("--batch-size") + 1] = "4"
    env = {**os.environ, "TOKENBOUNDS_TEST_BLOCK_SLEEP_S": "0.4", "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.Popen([sys.executable, "-m", "tokenbounds.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "killed" / "checkpoint"
    deadline = time.time() + 600  # generous: imports alone take minutes on a loaded 2-core machine
    blocks = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if ck.exists():
                blocks = len([p for p in os.listdir(ck) if p.startswith("block-") and p.endswith(".json")])
                if blocks >= 3:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        assert blocks >= 3, "no checkpoint blocks within the deadline (a slow machine, not a resume bug)"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "stats.json").exists()
    assert main(args) == 0  # resumes
    resumed = _stats(tmp_path / "killed")
    scored = resumed["evaluation"]["scoring"]["scored_tokens"]
    assert 0 < resumed["evaluation"]["run"]["tokens_this_run_rank0"] < scored
    clean_args = list(args)
    clean_args[clean_args.index("--out") + 1] = str(tmp_path / "clean")
    assert main(clean_args) == 0
    clean = _stats(tmp_path / "clean")
    assert resumed["unit_stats"] == clean["unit_stats"]
    assert {k: v for k, v in resumed.items() if k != "evaluation"} == {k: v for k, v in clean.items() if k != "evaluation"}


BAD = [
    (["--window", "80"], "exceeds the model's context of 64"),
    (["--window", "64"], "plus the prefix token"),
    (["--stride", "0"], "--stride must be >= 1"),
    (["--stride", "17"], "larger than --window"),
    (["--full-pass", "--sample-tokens", "10"], "cannot be combined with --sample-tokens"),
    (["--per-token-contexts"], "give --sample-tokens"),
    (["--per-token-contexts", "--sample-tokens", "5", "--stride", "2"], "--stride applies to windows"),
    (["--sample-tokens", "2.5"], "positive integer"),
    (["--train-tokens", "1e6"], "differs from the 99 data points"),
    (["--prefix-token", "bos"], "--prefix-token must be auto, none or a token id"),
    (["--prefix-token", "5000"], "not a token id"),
    (["--bits", "4", "--coded-bits", "5"], None),  # argparse: mutually exclusive
]


def test_bad_inputs_are_refused_with_a_reason(tmp_path, capsys):
    tiny_hf("gpt2", str(tmp_path / "m"))
    random_tokens(str(tmp_path / "short.bin"), 12)
    random_tokens(str(tmp_path / "d.bin"), 100)
    capsys.readouterr()
    assert main(_args(tmp_path / "m", [tmp_path / "short.bin"], tmp_path / "o0", "--no-plots")) == 2
    assert "shorter than one window" in capsys.readouterr().err
    for i, (extra, message) in enumerate(BAD):
        if message is None:
            with pytest.raises(SystemExit):
                main(_args(tmp_path / "m", [tmp_path / "d.bin"], tmp_path / f"o{i + 1}", *extra))
            continue
        assert main(_args(tmp_path / "m", [tmp_path / "d.bin"], tmp_path / f"o{i + 1}", "--no-plots", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)


def test_evaluation_is_frozen_and_rendering_does_not_change_it(tmp_path):
    from tokenbounds.eval.evaluation import Evaluation
    from tokenbounds.eval.report import compute_bounds, render_report

    tiny_hf("gpt2", str(tmp_path / "m"))
    random_tokens(str(tmp_path / "d.bin"), 200)
    assert main(_args(tmp_path / "m", [tmp_path / "d.bin"], tmp_path / "run", "--no-plots")) == 0
    doc = _stats(tmp_path / "run")
    from tokenbounds.eval import evaluation as E

    ev = _rebuild(E, doc["evaluation"])
    assert isinstance(ev, Evaluation)
    before = json.dumps(ev.to_dict(), sort_keys=True)
    assert json.loads(before) == doc["evaluation"]
    render_report(compute_bounds(doc, ev), ev, [])
    assert json.dumps(ev.to_dict(), sort_keys=True) == before
    with pytest.raises(AttributeError):
        ev.m = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        ev.coded.parts["model"] = 0.0  # type: ignore[index]


def _rebuild(E, d):
    parts = {"scoring": E.Scoring, "coded": E.CodedSize, "model": E.ModelInfo, "run": E.RunInfo}
    kw = {k: (parts[k](**v) if k in parts else v) for k, v in d.items()}
    kw["alphas"] = tuple(kw["alphas"])
    return E.Evaluation(**kw)
