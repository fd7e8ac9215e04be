"""Prequential coding / EDL (tokenbounds.prequential, `tokenbounds prequential`; spec section 8).

Each toy assertion comes with negative controls: the same runs also report what an
implementation that scores each batch after its update, or that uses the final model's
training loss (as L_test, or as the code), would give, and the tests assert that those fail the
check the right implementation passes.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenbounds.bounds import coupon_collector_edl_fraction, excess_description_length
from tokenbounds.cli import main
from tokenbounds.eval.train import TrainConfig, get_batch, train
from tokenbounds.models.gpt import GPT, GPTConfig
from tokenbounds.prequential import (
    INFORMATION_LABEL,
    PreparedModel,
    PrequentialConfig,
    PrequentialRecorder,
    TensorRows,
    WindowRows,
    information_content,
    information_content_of_run,
    run_prequential,
    run_seed,
    toys,
)

LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- spec checks
def test_spec_section_8_toy_checks():
    res = excess_description_length([2.0, 1.5, 1.2, 1.0, 0.9], 0.8)
    assert res.edl == pytest.approx(2.6, abs=1e-12)
    assert coupon_collector_edl_fraction(1.0) == pytest.approx(0.264241, abs=5e-7)
    ic = information_content([3.0, 2.0, 1.0], [0.5, 0.5, 0.5], num_tokens=6)
    assert (ic.mdl_bits, ic.final_bits, ic.k_bits) == (6.0, 1.5, 4.5)
    assert ic.label == INFORMATION_LABEL and "not a valid prior" in ic.label
    with pytest.raises(ValueError, match="same batches"):
        information_content([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------- the measurement
def _tiny_gpt(seed: int, vocab: int = 40, t: int = 8) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, context_length=t, n_layer=1, n_head=2, d_model=16))


def _maker(vocab: int = 40, t: int = 8):
    def make(seed):
        m = _tiny_gpt(seed, vocab, t)
        n = sum(p.numel() for p in m.parameters())
        return PreparedModel(m, n, n)

    return make


def _stream(n: int = 1200, vocab: int = 40, seed: int = 0) -> np.ndarray:
    """A learnable stream (a noisy cycle) so that training changes the losses."""
    r = np.random.default_rng(seed)
    base = np.arange(n) % 7 + 3 * (np.arange(n) // 50 % 3)
    noise = r.integers(0, vocab, n)
    return np.where(r.random(n) < 0.2, noise, base).astype(np.uint16)


def _manual_losses(rows, order, steps: int, b: int, lr: float, seed: int, *, after: bool = False):
    """Score each batch with the current model, then take one AdamW step on it (the definition,
    written independently of train()): per-batch code length in bits."""
    model = _tiny_gpt(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    out = []
    for j in range(steps):
        x, y = rows.batch(order[j * b:(j + 1) * b])
        logits = model(x)
        tl = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        if not after:
            out.append(float(tl.detach().double().sum()) / LN2)
        loss = tl.sum() / tl.numel()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if after:
            with torch.no_grad():
                la = model(x)
                out.append(float(F.cross_entropy(la.reshape(-1, la.shape[-1]), y.reshape(-1),
                                                 reduction="sum").double()) / LN2)
    return np.array(out), model


def test_prequential_losses_equal_a_manual_loop():
    rows = WindowRows([_stream()], 8)
    test = WindowRows([_stream(400, seed=1)], 8)
    cfg = PrequentialConfig(lr=3e-2, batch_rows=4, seeds=(0,), shuffle=True, prefixes=3)
    res = run_seed(_maker(), rows, test, cfg, 0, progress=False)
    order = np.random.default_rng([0, 0x5EED]).permutation(len(rows))
    steps = len(rows) // 4
    manual, model = _manual_losses(rows, order, steps, 4, 3e-2, 0)
    np.testing.assert_allclose(res["step_loss_bits"], manual, rtol=2e-5)
    # the final model's held-out loss is the manual model's
    with torch.no_grad():
        x, y = test.batch(np.arange(len(test)))
        ref = float(F.cross_entropy(model(x).reshape(-1, 40), y.reshape(-1)).double()) / LN2
    assert res["final"]["test_loss_bits"] == pytest.approx(ref, rel=1e-5)
    assert res["final"]["mdl_bits"] == pytest.approx(manual.sum(), rel=1e-6)
    assert res["final"]["edl_bits"] == pytest.approx(manual.sum() - res["final"]["tokens"] * ref, rel=1e-4)
    # negative control: scoring after the update is a different (smaller) code, by a lot
    after, _ = _manual_losses(rows, order, steps, 4, 3e-2, 0, after=True)
    assert after.sum() < manual.sum() - 50.0
    assert not np.allclose(res["step_loss_bits"], after, rtol=1e-2)


def test_prefixes_of_one_run_equal_separate_runs_and_cosine_runs_each():
    rows = WindowRows([_stream(1000)], 8)
    test = WindowRows([_stream(300, seed=1)], 8)
    cfg = PrequentialConfig(lr=2e-2, batch_rows=4, seeds=(1,), shuffle=False, prefix_steps=(5, 12, 31))
    res = run_seed(_maker(), rows, test, cfg, 1, progress=False)
    assert [p["steps"] for p in res["prefixes"]] == [5, 12, 31]
    assert res["cost"] == {"train_steps": 31, "train_rows": 124, "training_runs": 1, "held_out_evaluations": 3,
                           "held_out_tokens_per_evaluation": len(test) * 8}
    short = rows.subset(np.arange(12 * 4))
    alone = run_seed(_maker(), short, test, PrequentialConfig(lr=2e-2, batch_rows=4, seeds=(1,), shuffle=False,
                                                            prefixes=1), 1, progress=False)
    for key in ("mdl_bits", "test_loss_bits", "edl_bits"):
        assert res["prefixes"][1][key] == pytest.approx(alone["final"][key], rel=1e-6)
    cos = run_seed(_maker(), rows, test, PrequentialConfig(lr=2e-2, batch_rows=4, seeds=(1,), shuffle=False,
                                                           prefix_steps=(5, 12, 31), schedule="cosine"),
                   1, progress=False)
    assert cos["cost"]["train_steps"] == 5 + 12 + 31 and cos["cost"]["training_runs"] == 3
    assert cos["prefixes"][0]["mdl_bits"] != pytest.approx(res["prefixes"][0]["mdl_bits"], rel=1e-6)


def test_recording_leaves_train_bit_identical_and_gives_information_content():
    tokens = _stream(3000)
    cfg = TrainConfig(steps=20, batch_size=4, lr=1e-2, warmup_steps=3)
    plain = _tiny_gpt(0)
    res_plain = train(plain, tokens, cfg, progress=False)
    recorded = _tiny_gpt(0)
    rec = PrequentialRecorder(cfg.steps)
    res_rec = train(recorded, tokens, cfg, progress=False, on_step=rec)
    for a, b in zip(plain.state_dict().values(), recorded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert res_rec.losses_nats == res_plain.losses_nats
    # the recorded code of each batch is the loss train() logged for it (chunks of 10 steps)
    per_step = rec.loss_nats / rec.tokens
    np.testing.assert_allclose(per_step.reshape(2, 10).mean(1), res_plain.losses_nats, rtol=1e-5)
    batches = lambda s: get_batch(tokens, cfg.batch_size, 8, cfg.seed, s)  # noqa: E731
    ic = information_content_of_run(recorded, rec, batches)
    assert ic.mdl_bits == pytest.approx(rec.mdl_bits()) and ic.num_batches == 20
    assert 0 < ic.k_bits < ic.mdl_bits  # the trained model codes its own batches better than the run did


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    rows = WindowRows([_stream(1000)], 8)
    test = WindowRows([_stream(300, seed=1)], 8)
    cfg = PrequentialConfig(lr=2e-2, batch_rows=4, seeds=(0, 1), prefixes=3, checkpoint_seconds=0.0)
    ref = run_prequential(_maker(), rows, test, cfg, progress=False, log=lambda *_: None)

    calls = {"n": 0}

    class Boom(PrequentialRecorder):
        pass

    import tokenbounds.prequential.run as run_mod

    original = run_mod._PrefixRecorder.__call__

    def flaky(self, record):
        original(self, record)
        calls["n"] += 1
        if calls["n"] == 40:  # seed 0 finished (31 steps); seed 1 interrupted at its step 9
            raise KeyboardInterrupt

    run_mod._PrefixRecorder.__call__ = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            run_prequential(_maker(), rows, test, cfg, out_dir=str(tmp_path), progress=False, log=lambda *_: None)
    finally:
        run_mod._PrefixRecorder.__call__ = original
    assert os.path.exists(tmp_path / "seed-0.json") and not os.path.exists(tmp_path / "seed-1.json")
    logs = []
    again = run_prequential(_maker(), rows, test, cfg, out_dir=str(tmp_path), progress=False, log=logs.append)
    assert any("reusing" in m for m in logs)
    for a, b in zip(ref["prefixes"], again["prefixes"], strict=True):
        assert a["edl_bits"] == pytest.approx(b["edl_bits"], rel=1e-9)
        assert a["edl_bits_se"] == pytest.approx(b["edl_bits_se"], rel=1e-9)
    with pytest.raises(ValueError, match="different configuration"):
        run_prequential(_maker(), rows, test, PrequentialConfig(lr=1e-2, batch_rows=4, seeds=(0,), prefixes=3),
                        out_dir=str(tmp_path), progress=False, log=lambda *_: None)


def test_sequential_batch_is_one_epoch_over_the_tokens():
    from tokenbounds.eval.train import sequential_batch

    tokens = np.arange(1, 2 * 3 * 4 + 2, dtype=np.uint16)  # 25 tokens: 6 rows of 4 + 1
    ys = [sequential_batch(tokens, 3, 4, s)[1] for s in range(2)]
    assert torch.equal(torch.cat(ys).reshape(-1), torch.arange(2, 26))  # every token after the first, once
    x, y = sequential_batch(tokens, 3, 4, 0)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1], torch.tensor([5, 6, 7, 8]))
    x2, _ = sequential_batch(tokens, 3, 4, 0, order=np.array([5, 0, 1, 2, 3, 4]))
    assert torch.equal(x2[0], torch.tensor([21, 22, 23, 24]))
    with pytest.raises(IndexError, match="windows"):
        sequential_batch(tokens, 3, 4, 2)
    assert WindowRows([tokens], 4).batch(np.arange(6))[1].reshape(-1).tolist() == list(range(2, 26))


def test_rows_validate():
    with pytest.raises(ValueError, match="same number of tokens"):
        TensorRows(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[1, -100], [1, 1]]))
    with pytest.raises(ValueError, match="larger than the training data"):
        run_prequential(_maker(), WindowRows([_stream(30)], 8), WindowRows([_stream(30)], 8),
                        PrequentialConfig(batch_rows=8), progress=False)


# ----------------------------------------------------------------------------- toys (small sizes)
def test_random_labels_give_zero_edl_and_the_controls_do_not():
    r = toys.random_labels(n=128, seeds=(0, 1), controls=True)
    f = r["final"]
    tol = lambda key: 3 * (f[key + "_se"] or 0.0) + 1e-6 * f["rows"]  # noqa: E731
    assert abs(f["edl_bits"]) <= tol("edl_bits")
    assert f["train_loss_bits"] < 0.5  # it memorised its training labels (uniform: 4 bits) ...
    assert f["test_loss_bits"] == pytest.approx(4.0, abs=1e-6)  # ... and learned nothing else
    assert abs(f["edl_after_update_bits"]) > tol("edl_after_update_bits") + 50
    assert abs(f["edl_train_loss_bits"]) > tol("edl_train_loss_bits") + 50
    assert abs(f["edl_final_code_bits"]) > tol("edl_final_code_bits") + 50


def test_coupon_collector_matches_theory_and_the_controls_do_not():
    r = toys.coupon_collector(K=64, answers=64, u_max=6.0, u_grid=(0.25, 1.0, 2.0, 4.0, 6.0),
                              seeds=tuple(range(8)), controls=True)
    pre = r["prefixes"]

    def matches(key):  # within 3 SE over seeds, + 0.02 for Adam's few-step delay in learning a fact
        return all(abs(p[key] - p["theory_fraction"]) <= 3 * p[key + "_se"] + 0.02 for p in pre)

    assert matches("fraction"), [(p["fraction"], p["fraction_se"], p["theory_fraction"]) for p in pre]
    for key in ("fraction_after_update", "fraction_train_loss", "fraction_final_code"):
        assert not matches(key), key
    assert toys.rise_then_fall(r)  # the teaching signature (peak near u = 1.8)


@pytest.fixture(scope="module")
def skill_model():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one; fix the numerics here too
    try:
        return toys.pretrain_skill_model(cfg=toys.PretrainConfig(steps=600, batch=32))  # benchmark: 1000 x 64
    finally:
        torch.set_num_threads(n)


def test_pretrained_model_holds_the_skills(skill_model):
    w = toys.SkillWorld()
    a = np.arange(w.symbols)
    with torch.no_grad():
        for s in (0, 3):
            x = torch.tensor(np.stack([np.full(a.size, w.symbols + s), a], 1))
            known = F.cross_entropy(skill_model(x)[:, 1], torch.tensor(w.perms()[s, a])) / LN2
            x[:, 0] = w.unknown
            mixed = F.cross_entropy(skill_model(x)[:, 1], torch.tensor(w.perms()[s, a])) / LN2
            assert known < 0.3 and abs(mixed - w.mixture_loss_bits(s)) < 0.5


def test_elicitation_falls_teaching_rises_then_falls(skill_model):
    el = toys.elicitation(skill_model, n=256, n_min=64, seeds=(0, 1), controls=True)
    te = toys.teaching(skill_model, u_max=16.0, u_grid=(2.0, 4.0, 8.0, 16.0), seeds=(0, 1, 2), controls=True)

    assert toys.decreasing(el) and not toys.rise_then_fall(el)
    assert toys.rise_then_fall(te) and not toys.decreasing(te)
    per_param = el["final"]["edl_per_parameter"], te["final"]["edl_per_parameter"]
    assert per_param[0] < 0.005 and per_param[1] > 3 * per_param[0]
    # negative control: coding with the final model (its training loss) shows neither signature
    assert not toys.decreasing(el, "edl_final_code_per_sample")
    assert not toys.rise_then_fall(te, "edl_final_code_per_sample")


# ----------------------------------------------------------------------------- the command
def _bin(path, n, vocab=60, seed=0, tokenizer=None):
    from tokenbounds.eval.data import write_tokens

    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_tokens(str(path), _stream(n, vocab, seed))
    if tokenizer:
        with open(os.path.join(os.path.dirname(path), "tokenizer.json"), "w") as f:
            f.write(tokenizer)
    return str(path)


def _cli(*args):
    return main(["prequential", *map(str, args), "--no-progress", "--threads", "1"])


def test_cli_run_writes_json_png_and_reuses_seeds(tmp_path, capsys):
    data = _bin(tmp_path / "d" / "train.bin", 6000)
    out = tmp_path / "out"
    args = ("--model", "S", "--data", data, "--out", out, "--batch-tokens", 256, "--context-length", 16,
            "--seeds", 2, "--prefixes", 3, "--information-content")
    assert _cli(*args) == 0
    doc = json.loads((out / "prequential.json").read_text())
    assert doc["format"] == "tokenbounds.prequential/1" and doc["num_seeds"] == 2
    assert len(doc["prefixes"]) == 3 and doc["final"]["edl_per_parameter"] is not None
    assert doc["model"]["trained_parameters"] == doc["model"]["total_parameters"]
    assert "not a valid prior" in doc["information_content"]["label"]
    assert os.path.getsize(out / "prequential.png") > 10_000
    assert _cli(*args) == 0
    assert "reusing" in capsys.readouterr().out
    assert _cli(*args[:-1], "--lr", "0.5") == 2
    assert "different configuration" in capsys.readouterr().err


def test_cli_pretrained_with_lora_counts_adapters(tmp_path):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=60, context_length=16, n_layer=1, n_head=2, d_model=16))
    gpt.save(str(tmp_path / "gpt"))
    data = _bin(tmp_path / "d" / "train.bin", 4000)
    out = tmp_path / "out"
    assert _cli("--model", tmp_path / "gpt", "--data", data, "--out", out, "--lora", 2, "--batch-tokens", 128,
                "--seeds", 1, "--prefixes", 2, "--no-plots") == 0
    doc = json.loads((out / "prequential.json").read_text())
    assert doc["model"]["lora"]["rank"] == 2
    assert doc["model"]["trained_parameters"] == 2 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))


def test_cli_bad_inputs_give_clear_errors(tmp_path, capsys):
    good = _bin(tmp_path / "a" / "tokens.bin", 3000, tokenizer='{"a": 1}')

    def err(*args, batch_tokens=64):
        assert _cli(*args, "--out", tmp_path / "o", "--context-length", 16, "--batch-tokens", batch_tokens) == 2
        return capsys.readouterr().err

    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert "is empty (0 bytes)" in err("--model", "S", "--data", empty)
    one = _bin(tmp_path / "one.bin", 10)
    assert "not one row" in err("--model", "S", "--data", one)
    other = _bin(tmp_path / "b" / "tokens.bin", 3000, tokenizer='{"b": 2}')
    assert "another tokenizer" in err("--model", "S", "--data", good, "--test-data", other)
    big = tmp_path / "c" / "big.bin"
    from tokenbounds.eval.data import write_tokens

    os.makedirs(big.parent)
    write_tokens(str(big), np.full(500, 900, np.uint16))
    assert "contains token id 900" in err("--model", "S", "--data", good, "--test-data", big)
    assert "larger than the training data" in err("--model", "S", "--data", _bin(tmp_path / "s.bin", 400),
                                                  batch_tokens=64 * 16)
    assert "smaller than one row" in err("--model", "S", "--data", good, batch_tokens=8)
    text = tmp_path / "t.txt"
    text.write_text("some text")
    assert "no tokenizer" in err("--model", "S", "--data", text)
    assert "neither a size" in err("--model", "XXL", "--data", good)


def test_readme_information_content_example_runs():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("**Information content (Finzi et al. 2025).**"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cfg = TrainConfig(steps=12, batch_size=4, lr=1e-2, warmup_steps=2)
    env = {"model": _tiny_gpt(0), "tokens": _stream(2000), "cfg": cfg, "T": 8}
    exec(compile(code, "README.md", "exec"), env)
    assert env["k"].num_batches == 12 and env["k"].k_bits > 0


def test_cli_hugging_face_model_with_lora(tmp_path):
    pytest.importorskip("transformers")
    from _tiny_models import random_tokens, tiny_hf

    tiny_hf("llama", str(tmp_path / "hf"))
    random_tokens(str(tmp_path / "train.bin"), 3000)
    out = tmp_path / "out"
    assert _cli("--model", tmp_path / "hf", "--data", tmp_path / "train.bin", "--out", out, "--lora", 1,
                "--context-length", 16, "--batch-tokens", 64, "--seeds", 1, "--prefixes", 2, "--no-plots") == 0
    doc = json.loads((out / "prequential.json").read_text())
    assert 0 < doc["model"]["trained_parameters"] < doc["model"]["total_parameters"] / 10
    assert doc["final"]["mdl_per_token"] > 0 and math.isfinite(doc["final"]["edl_bits"])


@pytest.mark.slow
def test_full_size_toys_as_in_the_benchmark():
    c = toys.coupon_collector(K=128, seeds=tuple(range(8)), controls=True)
    assert all(abs(p["fraction"] - p["theory_fraction"]) <= 3 * p["fraction_se"] + 0.02 for p in c["prefixes"])
    model = toys.pretrain_skill_model()
    el = toys.elicitation(model, n=1024, n_min=64, controls=True)
    te = toys.teaching(model, controls=True)
    assert toys.decreasing(el) and toys.rise_then_fall(te)
    assert te["final"]["edl_per_parameter"] > 3 * el["final"]["edl_per_parameter"]
