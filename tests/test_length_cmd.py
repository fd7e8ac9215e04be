"""`tokenbounds length`: populations by position, the union over buckets, extrapolating and
refusing models, resume, and the CLI end to end on tiny GPTs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from tokenbounds.bounds import from_stats
from tokenbounds.eval.data import write_tokens
from tokenbounds.length.positions import (
    BucketedState,
    LengthOptions,
    bucket_bounds,
    measure_length,
    position_populations,
)
from tokenbounds.losses import DEFAULT_ALPHAS, TokenLosses
from tokenbounds.models.gpt import GPT, GPTConfig

VOCAB = 40
T = 16


def tiny_gpt(directory: str, encoding: str, context_length: int = T, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, context_length=context_length, n_layer=1, n_head=2, d_model=16,
                          position_encoding=encoding))
    with torch.no_grad():  # far from uniform predictions, so losses differ by position
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save(directory)
    return directory


def token_file(path: str, n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    # a period-7 pattern with noise: a model can do better with more context
    base = np.tile(rng.integers(1, VOCAB, size=7), n // 7 + 1)[:n]
    noise = rng.random(n) < 0.2
    write_tokens(path, np.where(noise, rng.integers(1, VOCAB, size=n), base).astype(np.uint16))
    return path


def windows(n, L):
    """(start, last target) of each window of a file of n tokens under evaluate's window rule at
    window = stride = L, written out independently of the engine."""
    out = []
    for first in range(1, n, L):
        last = min(first + L - 1, n - 1)
        out.append((max(0, last - L), first, last))
    return out


def brute_populations(sizes, L):
    out = np.zeros(L, dtype=np.int64)
    for n in sizes:
        for start, first, last in windows(n, L):
            for k in range(first, last + 1):
                out[k - start - 1] += 1
    return out


@pytest.mark.parametrize("sizes,L", [([2], 1), ([10], 3), ([100, 7, 33], 16), ([64], 64), ([65, 5], 64), ([70], 64)])
def test_position_populations_count_every_target_once(sizes, L):
    pop = position_populations(sizes, L)
    assert pop.sum() == sum(n - 1 for n in sizes)  # the populations sum to m
    np.testing.assert_array_equal(pop, brute_populations(sizes, L))


def _fake_losses(rng, n, alphas=DEFAULT_ALPHAS, vocab=VOCAB):
    nll = rng.uniform(0.5, 5.0, size=(n, len(alphas)))
    return TokenLosses(nll, -nll[:, 0] * np.log(2.0), rng.integers(0, vocab, size=n), np.ones(n, dtype=bool),
                       tuple(alphas), vocab)


def test_bucketed_state_splits_by_position_and_merges_exactly():
    rng = np.random.default_rng(0)
    edges = np.array([1, 2, 4, 9, 17])
    a, b = BucketedState.empty(edges, DEFAULT_ALPHAS, VOCAB), BucketedState.empty(edges, DEFAULT_ALPHAS, VOCAB)
    pos1, pos2 = rng.integers(1, 17, size=200), rng.integers(1, 17, size=50)
    l1, l2 = _fake_losses(rng, 200), _fake_losses(rng, 50)
    a.update(l1, pos1, np.zeros(200, dtype=np.int64), np.ones(1, dtype=np.int64))
    b.update(l2, pos2, np.zeros(50, dtype=np.int64), np.ones(1, dtype=np.int64))
    both = BucketedState.from_state_dict(json.loads(json.dumps(a.state_dict()))).merge(b)
    pos = np.concatenate([pos1, pos2])
    nll = np.concatenate([l1.nll_bits, l2.nll_bits])
    for j, st in enumerate(both.buckets):
        sel = (pos >= edges[j]) & (pos < edges[j + 1])
        assert st.count == sel.sum()
        np.testing.assert_allclose(st.mean, nll[sel].mean(0), rtol=1e-12)
    assert sum(s.count for s in both.buckets) == 250 == both.position_buckets(8).m
    with pytest.raises(ValueError, match="outside 1..16"):
        a.update(l2, np.full(50, 17), np.zeros(50, dtype=np.int64), np.ones(1, dtype=np.int64))
    with pytest.raises(ValueError, match="full pass"):
        a.update(l2, pos2, np.zeros(50, dtype=np.int64), np.array([2]))


def test_union_over_buckets_is_paid():
    rng = np.random.default_rng(1)
    edges = np.array([1, 5, 9, 17])
    state = BucketedState.empty(edges, DEFAULT_ALPHAS, VOCAB)
    state.update(_fake_losses(rng, 3000), rng.integers(1, 17, size=3000), np.zeros(3000, dtype=np.int64),
                 np.ones(1, dtype=np.int64))
    C = 5000.0
    recs = bucket_bounds(state, C, delta=0.05, vocab_size=VOCAB)
    assert [r["delta"] for r in recs] == [0.05 / 3] * 3
    for st, r in zip(state.buckets, recs, strict=True):
        paid = from_stats(st, C, st.count, delta=0.05 / 3, vocab_size=VOCAB, full_pass=True).best["bound_bits"]
        # negative control: the same bucket at the full delta, i.e. the union over buckets not paid
        unpaid = from_stats(st, C, st.count, delta=0.05, vocab_size=VOCAB, full_pass=True).best["bound_bits"]
        assert r["bound_bits"] == pytest.approx(paid, rel=1e-12)
        assert r["bound_bits"] > unpaid
        assert r["m"] == st.count
    with pytest.raises(ValueError, match="delta"):
        bucket_bounds(state, C, delta=1.5, vocab_size=VOCAB)


def _opts(tmp_path, model, data, L, **kw):
    kw = {"buckets": 8, "progress": False, "threads": 1, **kw}
    return LengthOptions(model=model, data=[data], max_length=L, out=str(tmp_path / "out"), **kw)


@pytest.mark.parametrize("encoding", ["rope", "alibi", "none"])
def test_extrapolating_gpt_is_scored_beyond_t(tmp_path, encoding):
    model = tiny_gpt(str(tmp_path / "m"), encoding)
    data = token_file(str(tmp_path / "d.bin"), 700)
    doc = measure_length(_opts(tmp_path, model, data, 2 * T, plots=False), log=lambda _: None)
    assert doc["training_context"] == T and doc["max_length"] == 2 * T
    assert doc["m"] == 699 == sum(doc["populations"]) == sum(r["m"] for r in doc["buckets"])
    np.testing.assert_array_equal(doc["per_position"]["count"], brute_populations([700], 2 * T))
    beyond = [r for r in doc["buckets"] if r["beyond_training"]]
    assert beyond and all(r["positions"][0] > T for r in beyond)
    assert any(r["positions"] == [T + 1, r["positions"][1]] for r in beyond)  # T + 1 is an edge
    assert all(r["positions"][1] <= T for r in doc["buckets"] if not r["beyond_training"])
    B = len(doc["buckets"])
    assert doc["buckets_paid"] == B and all(r["delta"] == pytest.approx(0.05 / B) for r in doc["buckets"])
    assert all(r["bound_bits"] >= r["empirical_bits"] for r in doc["buckets"])


def test_scores_match_a_plain_forward_of_each_window(tmp_path):
    """Position p of a window is predicted from exactly the p tokens before it."""
    model_dir = tiny_gpt(str(tmp_path / "m"), "rope")
    n, L = 97, 2 * T
    data = token_file(str(tmp_path / "d.bin"), n)
    doc = measure_length(_opts(tmp_path, model_dir, data, L, plots=False), log=lambda _: None)
    model = GPT.load(model_dir).double().eval()
    tokens = np.fromfile(data, dtype=np.uint16).astype(np.int64)
    sums, counts = np.zeros(L), np.zeros(L)
    with torch.no_grad():
        for start, first, last in windows(n, L):
            x = torch.from_numpy(tokens[start:last + 1])
            logp = torch.log_softmax(model(x[None, :-1])[0], -1)
            bits = -logp[torch.arange(len(x) - 1), x[1:]].numpy() / np.log(2.0)
            scored = np.arange(first, last + 1) - start  # positions of this window's targets
            sums[scored - 1] += bits[scored - 1]
            counts[scored - 1] += 1
    np.testing.assert_allclose(doc["per_position"]["mean_nll_bits"], sums / counts, rtol=1e-4, atol=1e-5)


def test_learned_positions_are_refused_beyond_t_and_scored_up_to_it(tmp_path):
    model = tiny_gpt(str(tmp_path / "m"), "learned")
    data = token_file(str(tmp_path / "d.bin"), 300)
    with pytest.raises(ValueError, match=r"learned absolute position.*--max-length 16 or less.*rope"):
        measure_length(_opts(tmp_path, model, data, T + 1), log=lambda _: None)
    doc = measure_length(_opts(tmp_path, model, data, T, plots=False), log=lambda _: None)
    assert not any(r["beyond_training"] for r in doc["buckets"]) and doc["m"] == 299


def test_bad_inputs_give_clear_errors(tmp_path):
    model = tiny_gpt(str(tmp_path / "m"), "rope")
    data = token_file(str(tmp_path / "d.bin"), 50)
    for L in (0, -3):
        with pytest.raises(ValueError, match="--max-length must be an integer >= 1"):
            measure_length(_opts(tmp_path, model, data, L), log=lambda _: None)
    with pytest.raises(ValueError, match=r"longest file holds 50 tokens.*--max-length 49 or less"):
        measure_length(_opts(tmp_path, model, data, 64), log=lambda _: None)
    with pytest.raises(ValueError, match="--buckets"):
        measure_length(_opts(tmp_path, model, data, 8, buckets=0), log=lambda _: None)
    empty = str(tmp_path / "empty.bin")
    write_tokens(empty, np.zeros(0, dtype=np.uint16))
    with pytest.raises(ValueError, match="is empty: there are no tokens"):
        measure_length(_opts(tmp_path, model, empty, 8), log=lambda _: None)
    one = str(tmp_path / "one.bin")
    write_tokens(one, np.ones(1, dtype=np.uint16))
    with pytest.raises(ValueError, match="at least 2 are needed"):
        measure_length(_opts(tmp_path, model, one, 8), log=lambda _: None)


def test_hf_model_refused_beyond_its_max_positions(tmp_path):
    pytest.importorskip("transformers")
    from _tiny_models import tiny_hf

    tiny_hf("gpt2", str(tmp_path / "hf"), vocab=VOCAB)  # n_positions = 64
    data = token_file(str(tmp_path / "d.bin"), 300)
    with pytest.raises(ValueError, match=r"declares 64 positions.*--max-length 63 or less.*--prefix-token none"):
        measure_length(_opts(tmp_path, str(tmp_path / "hf"), data, 64), log=lambda _: None)
    doc = measure_length(_opts(tmp_path, str(tmp_path / "hf"), data, 64, prefix_token="none", plots=False),
                         log=lambda _: None)
    assert doc["m"] == 299 and not any(r["beyond_training"] for r in doc["buckets"])


def test_resume_gives_the_same_numbers(tmp_path):
    model = tiny_gpt(str(tmp_path / "m"), "alibi")
    data = token_file(str(tmp_path / "d.bin"), 900)
    opts = _opts(tmp_path, model, data, 2 * T, plots=False, batch_size=4, checkpoint_every=2)
    first = measure_length(opts, log=lambda _: None)
    ckpt = os.path.join(opts.out, "checkpoint")
    blocks = sorted(f for f in os.listdir(ckpt) if f.startswith("block-"))
    assert len(blocks) == first["run"]["blocks"] > 2
    for f in blocks[1:]:  # as if interrupted after the first block
        os.remove(os.path.join(ckpt, f))
    again = measure_length(opts, log=lambda _: None)
    assert 0 < again["run"]["tokens_scored_this_run"] < first["run"]["tokens_scored_this_run"]
    assert again["buckets"] == first["buckets"]


def test_cli_end_to_end(tmp_path, capsys):
    from tokenbounds.cli import main

    model = tiny_gpt(str(tmp_path / "m"), "rope")
    data = token_file(str(tmp_path / "d.bin"), 600)
    out = str(tmp_path / "out")
    rc = main(["length", "--model", model, "--data", data, "--max-length", str(4 * T), "--out", out,
               "--buckets", "6", "--delta", "0.1", "--no-progress", "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "beyond" in printed and "delta / B" in printed
    doc = json.load(open(os.path.join(out, "length.json")))
    assert doc["delta"] == 0.1 and doc["max_length"] == 64 and sum(doc["populations"]) == doc["m"] == 599
    assert os.path.getsize(os.path.join(out, "length.png")) > 1000
    rc = main(["length", "--model", model, "--data", data, "--max-length", "0", "--out", out])
    assert rc == 2 and "--max-length must be an integer >= 1" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    from tokenbounds.cli import build_parser, main

    with pytest.raises(SystemExit):
        main(["length", "--help"])
    out = capsys.readouterr().out
    assert "delta / B" in out and "--max-length" in out and "learned absolute positions" in out
    sub = build_parser()._subparsers._group_actions[0].choices["length"]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"option {action.option_strings} has no help"


def test_bits_runs_the_tbq_quantizer_and_prices_its_file(tmp_path, capsys):
    # --bits is evaluate's --bits: the .tbq quantizer on the data, C = the written file's bits
    from tokenbounds.cli import main

    model = tiny_gpt(str(tmp_path / "m"), "rope")
    data = token_file(str(tmp_path / "d.bin"), 600)
    out = str(tmp_path / "out")
    rc = main(["length", "--model", model, "--data", data, "--max-length", str(2 * T), "--out", out,
               "--bits", "4", "--no-progress", "--no-plots", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    doc = json.load(open(os.path.join(out, "length.json")))
    assert doc["coded"]["method"].startswith("tbq 4-bit")
    tbq = os.path.join(out, "quantized.tbq")
    assert doc["coded"]["coded_bits"] >= 8 * os.path.getsize(tbq)
