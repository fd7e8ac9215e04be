"""Data pipeline: documents, tokenizer, token files, sampling, training."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from tokenbounds.eval import data, train
from tokenbounds.models.gpt import GPT, GPTConfig


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return data.build_corpus(str(cache), ["tiny"], vocab_size=300, log=lambda *a: None)


# ----------------------------------------------------------------------------- corpus + files
def test_kjv_chapter_split():
    text = (
        "\nGenesis 1\n\n  1 In the beginning God created the heaven and the earth.\n"
        "  2 And the earth was without form, and void; and darkness was upon the face of\n"
        "the deep.\n\nGenesis 2\n\n  1 Thus the heavens 2\n\n1 Kings 3\n\n  1 And Solomon\n"
    )
    docs = data.split_kjv_chapters(text)
    assert [d.splitlines()[0] for d in docs] == ["Genesis 1", "Genesis 2", "1 Kings 3"]
    assert "the deep." in docs[0] and "the deep." not in docs[1]


def test_tiny_corpus_layout(tiny_corpus):
    tokens = np.asarray(tiny_corpus.tokens())
    assert tokens.dtype == np.uint16
    assert tokens.size == tiny_corpus.n_tokens
    assert tokens[0] == tokens[-1] == tiny_corpus.eot_id == 0
    # one EOT before each document and one at the end
    assert int((tokens == 0).sum()) == tiny_corpus.n_documents + 1
    assert tiny_corpus.num_data_tokens == tokens.size - 1
    # decoding the first document gives back the text
    tok = tiny_corpus.tokenizer()
    second_eot = int(np.flatnonzero(tokens == 0)[1])
    assert tok.decode(tokens[1:second_eot].tolist()) == data.tiny_documents()[0]
    # vocab = EOT + 256 bytes + one token per merge
    assert tok.get_vocab_size() == 257 + len(data.tokenizer_merges(tok))
    assert tiny_corpus.vocab_size == tok.get_vocab_size() <= 300


def test_corpus_cache_is_reused_and_reproducible(tiny_corpus, tmp_path):
    again = data.build_corpus(str(tmp_path), ["tiny"], vocab_size=300, log=lambda *a: None)
    assert again.tokens_sha256 == tiny_corpus.tokens_sha256  # same recipe, same bytes
    cached = data.build_corpus(str(tmp_path), ["tiny"], vocab_size=300,
                               log=lambda *a: pytest.fail("rebuilt a complete cached corpus"))
    assert cached.tokens_sha256 == again.tokens_sha256


def test_token_file_round_trip(tmp_path):
    ids = np.array([0, 5, 65535, 7, 0], dtype=np.uint16)
    path = str(tmp_path / "t.bin")
    data.write_tokens(path, ids)
    assert (tmp_path / "t.bin").stat().st_size == 10
    mm = data.load_tokens(path)
    assert isinstance(mm, np.memmap) and np.array_equal(mm, ids)
    with pytest.raises(ValueError, match="multiple"):
        data.write_tokens(path, np.array([1, 2, 3], dtype=np.uint16))
        data.load_tokens(path, "uint32")
    with pytest.raises(TypeError):
        data.write_tokens(path, np.array([1, 2], dtype=np.int64))


def test_tokenizer_bits_counts_merges():
    tok = data.train_tokenizer(data.tiny_documents(), 280)
    k = len(data.tokenizer_merges(tok))
    assert k == tok.get_vocab_size() - 257 > 0
    expected = math.ceil(sum(2 * math.log2(257 + j) for j in range(k))) + 2 * int(math.log2(k + 1)) + 1
    assert data.tokenizer_description_bits(tok) == expected


def test_unknown_source_is_reported(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus source"):
        data.build_corpus(str(tmp_path), ["nope"], 300)


@pytest.mark.skipif(shutil.which("bible") is None, reason="bible-kjv not installed (scripts/get_corpus.sh)")
def test_kjv_documents():
    docs = data.kjv_documents()
    assert len(docs) == 1189
    assert docs[0].startswith("Genesis 1\n") and "In the beginning God created" in docs[0]
    assert docs[-1].startswith("Revelation 22")


# ----------------------------------------------------------------------------- sampling
def _toy_tokens():
    # EOT=0 documents of lengths 3, 1, 6, 2
    return np.array([0, 1, 2, 3, 0, 4, 0, 5, 6, 7, 8, 9, 10, 0, 11, 12, 0], dtype=np.uint16)


def test_token_streams_locate_points_and_end_of_text():
    toks = _toy_tokens()
    streams = data.TokenStreams([toks, toks[:5]], eot_id=0)
    assert streams.num_points == (toks.size - 1) + 4
    f, k = streams.locate(np.arange(streams.num_points))
    assert f.tolist() == [0] * (toks.size - 1) + [1] * 4
    assert k.tolist() == list(range(1, toks.size)) + [1, 2, 3, 4]
    pos = np.arange(1, toks.size)
    last = streams.last_eot_before(0, pos)
    assert last.tolist() == [max(j for j in range(i) if toks[j] == 0) for i in pos]
    assert streams.eots(0).tolist() == np.flatnonzero(toks == 0).tolist()
    with pytest.raises(ValueError, match="at least 2 tokens"):
        data.TokenStreams([toks[:1]])


def test_window_scoring_matches_full_logits(tiny_corpus):
    """The engine's full pass over a corpus equals each target scored from the full logits of
    its own context (the window rule restated)."""
    from tokenbounds.eval.hf import FusedHead
    from tokenbounds.eval.sample import ContextRule, Units, plan_units
    from tokenbounds.eval.score import Scorer

    torch.manual_seed(0)
    toks = np.asarray(tiny_corpus.tokens())[:600]
    model = GPT(GPTConfig(vocab_size=tiny_corpus.vocab_size, context_length=12, n_layer=1, n_head=2, d_model=16))
    streams = data.TokenStreams([toks], 0)
    rule = ContextRule("windows", 12, 5)
    units = Units(streams, 5)
    state = Scorer(FusedHead(model), streams, units, rule, (0.0, 0.1)).score(
        plan_units(units, rule, sample_tokens=None, seed=0), batch_size=7)
    assert state.stats.count == toks.size - 1
    nll = []
    with torch.no_grad():
        for k in range(1, toks.size):
            last = min(((k - 1) // 5 + 1) * 5, toks.size - 1)
            st = max(0, last - 12)
            logits = model(torch.from_numpy(toks[st:k].astype(np.int64))[None])[0, -1].double()
            nll.append(-torch.log_softmax(logits, -1)[int(toks[k])].item() / math.log(2))
    assert state.stats.mean_bits[0.0] == pytest.approx(float(np.mean(nll)), rel=1e-5)


# ----------------------------------------------------------------------------- training
def test_training_loss_decreases_and_resume_is_exact(tiny_corpus, tmp_path, monkeypatch):
    toks = np.asarray(tiny_corpus.tokens())
    cfg_m = GPTConfig(vocab_size=tiny_corpus.vocab_size, context_length=16, n_layer=1, n_head=2, d_model=32)
    cfg = train.TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup_steps=4, bf16=False)

    torch.manual_seed(0)
    full = GPT(cfg_m)
    res = train.train(full, toks, cfg, progress=False)
    assert len(res.losses_nats) == 4
    assert res.losses_nats[-1] < res.losses_nats[0] - 1.0  # nats; starts at ~ln V = 5.7

    # interrupted at step 25 then resumed: identical final weights
    torch.manual_seed(0)
    part = GPT(cfg_m)
    ckpt = str(tmp_path / "ckpt.pt")
    real = train.get_batch

    def interrupt(tokens, b, t, seed, step):
        if step == 25:
            raise KeyboardInterrupt
        return real(tokens, b, t, seed, step)

    monkeypatch.setattr(train, "get_batch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train.train(part, toks, cfg, checkpoint_path=ckpt, progress=False, log=lambda *a: None)
    monkeypatch.setattr(train, "get_batch", real)
    torch.manual_seed(123)
    resumed = GPT(cfg_m)
    res2 = train.train(resumed, toks, cfg, checkpoint_path=ckpt, progress=False, log=lambda *a: None)
    assert res2.resumed_from == 25 and res2.tokens_seen == res.tokens_seen
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    # a checkpoint from another configuration is refused, not silently used
    with pytest.raises(ValueError, match="different configuration"):
        train.train(GPT(cfg_m), toks, train.TrainConfig(steps=41, bf16=False), checkpoint_path=ckpt, progress=False)


def test_tokenizer_training_subset_is_strided_and_capped():
    docs = [f"doc {i} " * (10 + i) for i in range(50)]
    assert data.tokenizer_training_documents(docs, 10**9) == docs
    total = sum(len(d) for d in docs)
    sub = data.tokenizer_training_documents(docs, total // 3)
    assert sum(len(d) for d in sub) <= total // 3
    k = docs.index(sub[1])
    assert k >= 2 and sub == docs[::k]


def test_gcide_reader_handles_cp1252_and_entries(tmp_path):
    import gzip

    raw = (b"Abacus \\Ab\"a*cus\\, n.\n   A counting frame.\n   [1913 Webster]\n\n"
           b"Caf\xe9 \\Caf\"\xe9\\, n.\n   A coffee house.\n\n"
           + "Na\u00efve \\Na*\"ive\\, a.\n   Simple.\n".encode())
    path = tmp_path / "gcide.dict.dz"
    with gzip.open(path, "wb") as f:
        f.write(raw)
    docs = data.gcide_documents(str(path), entries_per_doc=2)
    assert len(docs) == 2
    assert docs[0].startswith("Abacus") and "Caf\u00e9" in docs[0]  # cp1252 fallback
    assert docs[1].startswith("Na\u00efve")
    with pytest.raises(data.CorpusUnavailable, match="dict-gcide"):
        data.gcide_documents(str(tmp_path / "missing.dz"))
