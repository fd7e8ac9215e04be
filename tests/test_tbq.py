"""The .tbq file (tokenbounds.quant.tbq) and the layer-by-layer quantizer that writes it
(tokenbounds.quant.layerwise): exact round trip, C = file size, resume, refusals."""

from __future__ import annotations

import copy
import hashlib
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from tokenbounds.models.gpt import GPT, GPTConfig
from tokenbounds.quant import layerwise
from tokenbounds.quant.layerwise import (
    QuantizeRunMismatch,
    calibration_windows,
    quantize_model_to_tbq,
)
from tokenbounds.quant.tbq import TBQError, apply_tbq, load_tbq, parse_tbq

VOCAB = 96


def _gpt(seed: int = 0, **over) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, context_length=32, n_layer=2, n_head=2, d_model=32)
    cfg.update(over)
    return GPT(GPTConfig(**cfg)).eval()


def _calib(n: int = 6, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def gpt_tbq():
    model = _gpt()
    fp = copy.deepcopy(model)
    tbq = quantize_model_to_tbq(model, _calib(), bits=2, codebook="e8", method="ldlq", progress=False)
    return fp, model, tbq


# ------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("codebook, method, sequential", [
    ("uniform", "ldlq", False), ("uniform", "rtn", False), ("e8", "ldlq", True), ("e8", "rtn", False),
])
def test_encode_file_decode_is_bit_identical_and_c_is_the_file_size(tmp_path, codebook, method, sequential):
    model = _gpt()
    tbq = quantize_model_to_tbq(model, _calib(), bits=3 if codebook == "uniform" else 2, codebook=codebook,
                                method=method, sequential=sequential, progress=False)
    path = tmp_path / "q.tbq"
    tbq.save(str(path))
    back = load_tbq(str(path))
    assert back.coded_bits == tbq.coded_bits == 8 * os.path.getsize(path)
    assert sum(back.coded_bits_detail.values()) == back.coded_bits
    assert back.coded_bits_detail == tbq.coded_bits_detail
    assert all(v > 0 for v in back.coded_bits_detail.values())
    # the model now carries exactly the decoded weights, and the file decodes to them
    _assert_same_state(back.state_dict(), model.state_dict())
    _assert_same_state(back.state_dict(), tbq.state_dict())
    assert back.tied == {"lm_head.weight": "tok_emb.weight"}
    kinds = {e["n"]: e["k"] for e in back.entries}
    assert kinds["pos_emb.weight"] == kinds["blocks.0.attn.qkv.weight"] == "q"
    assert kinds["blocks.0.ln1.weight"] == "raw" and back.tensor("blocks.0.ln1.weight").dtype == torch.float32
    # norms and biases are stored as float16 (decoded back to the model's dtype)
    e = next(e for e in back.entries if e["n"] == "blocks.0.ln1.bias")
    assert e["store"] == "float16" and back.tensor_bits["blocks.0.ln1.bias"] == 16 * 32
    # the file alone rebuilds the model
    rebuilt = back.build_model()
    _assert_same_state(rebuilt.state_dict(), model.state_dict())
    # and the codes themselves survive: a QuantizedModel view decodes to the same weights
    qm = back.to_quantized_model()
    sd = qm.dequantized_state_dict()
    for k, v in sd.items():
        assert torch.equal(v.to(torch.float32), model.state_dict()[k]), k


def test_statistics_of_the_decoded_model_equal_the_in_memory_model(tmp_path, gpt_tbq):
    from tokenbounds.eval.sample import evaluate_sample, sample_tokens

    fp, quantized, tbq = gpt_tbq
    path = tmp_path / "q.tbq"
    tbq.save(str(path))
    fresh = copy.deepcopy(fp)
    report = apply_tbq(fresh, str(path))
    assert report["coded_bits"] == 8 * os.path.getsize(path) and report["method"] == "tbq file size"
    assert report["num_parameters"] == sum(p.numel() for p in fp.parameters())
    tokens = np.random.default_rng(0).integers(0, VOCAB, 3000).astype(np.uint16)
    sample = sample_tokens(tokens, 400, context_length=32, seed=1, eot_id=None)
    a = evaluate_sample(quantized, tokens, sample, batch_size=50)
    b = evaluate_sample(fresh, tokens, sample, batch_size=50)
    assert a.state_dict() == b.state_dict()
    c = evaluate_sample(fp, tokens, sample, batch_size=50)
    assert c.state_dict() != a.state_dict()  # a negative control: quantization did change the model


def _tiny_hf_in_memory(family: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=True)
        return tf.LlamaForCausalLM(cfg).eval()
    cfg = tf.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return tf.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_models_round_trip_llama_and_gpt2_conv1d(family):
    pytest.importorskip("transformers")
    model = _tiny_hf_in_memory(family)
    calib = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(1))
    tbq = quantize_model_to_tbq(model, calib, bits=3, codebook="uniform", progress=False, sequential=True)
    fresh = _tiny_hf_in_memory(family, seed=1)  # same architecture, other weights
    apply_tbq(fresh, parse_tbq(tbq.data))
    _assert_same_state(fresh.state_dict(), model.state_dict())
    x = calib[:2]
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)
    if family == "gpt2":  # Conv1D weights [in, out] are coded transposed
        e = next(e for e in tbq.entries if e["n"] == "transformer.h.0.mlp.c_fc.weight")
        assert e["k"] == "q" and e.get("t") and tbq.shapes[e["n"]] == (32, 128)
        assert tbq.tied == {"lm_head.weight": "transformer.wte.weight"}
    else:  # SmolLM2's layout: the tied embedding is coded once, as the embedding
        assert tbq.tied == {"lm_head.weight": "model.embed_tokens.weight"}
        assert tbq.info["tensors"]["model.embed_tokens.weight"]["hessian"].startswith("tied")
        assert tbq.info["tensors"]["model.layers.1.mlp.down_proj.weight"]["hessian"] == "E[x x^T]"
    with pytest.raises(TBQError, match="another architecture"):
        apply_tbq(_gpt(), tbq)


def test_sequential_changes_later_layers_and_the_whole_model_fallback_matches_the_chain(monkeypatch):
    calib = _calib()
    plain = quantize_model_to_tbq(_gpt(), calib, bits=2, codebook="uniform", progress=False)
    seq = quantize_model_to_tbq(_gpt(), calib, bits=2, codebook="uniform", sequential=True, progress=False)
    a, b = plain.state_dict(), seq.state_dict()
    assert torch.equal(a["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])  # same inputs
    assert not torch.equal(a["blocks.1.mlp.2.weight"], b["blocks.1.mlp.2.weight"])
    # without the cached block chain (one forward of the whole model per group): same Hessians
    monkeypatch.setattr(layerwise, "_chain_matches", lambda *a, **k: False)
    logs = []
    slow = quantize_model_to_tbq(_gpt(), calib, bits=2, codebook="uniform", progress=False, log=logs.append)
    assert any("one forward of the whole model" in m for m in logs)
    for k, v in slow.state_dict().items():
        torch.testing.assert_close(v, a[k], rtol=0, atol=1e-6)


def test_layer_groups_follow_shared_inputs(gpt_tbq):
    _, _, tbq = gpt_tbq
    info = tbq.info["tensors"]
    assert info["tok_emb.weight"]["hessian"].startswith("tied")  # the LM head's and the embedding's
    assert info["pos_emb.weight"]["hessian"] == "identity"
    e = {e["n"]: e for e in tbq.entries}
    assert e["tok_emb.weight"]["incoherence"] is False and e["blocks.0.mlp.0.weight"]["incoherence"] is True
    # embeddings get the next setting by default (2 -> 3 bits), linear layers the asked one
    assert e["tok_emb.weight"]["bits"] == e["pos_emb.weight"]["bits"] == 3 and e["blocks.0.mlp.0.weight"]["bits"] == 2
    same = quantize_model_to_tbq(_gpt(), _calib(), bits=2, codebook="e8", embedding_bits=2, progress=False)
    assert {x["bits"] for x in same.entries if x["k"] == "q"} == {2} and same.coded_bits < tbq.coded_bits
    from tokenbounds.quant.layerwise import default_embedding_bits

    assert [default_embedding_bits(b, "uniform") for b in (2, 3, 4, 8)] == [3, 4, 8, 8]
    assert [default_embedding_bits(b, "e8") for b in (2, 3, 4)] == [3, 4, 4]
    assert info["blocks.0.mlp.0.weight"]["hessian"] == "E[x x^T]"
    assert all(0 < v["proxy_loss"] < 1 for v in info.values())
    seeds = {e["n"]: e["seed"] for e in tbq.entries if e["k"] == "q"}
    assert len(set(seeds.values())) == len(seeds)  # every tensor its own Hadamard signs


# ------------------------------------------------------------------------------- resume
def test_an_interrupted_run_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    calib = _calib()
    kw = dict(bits=2, codebook="e8", sequential=True, progress=False)
    want = quantize_model_to_tbq(_gpt(), calib, **kw).data
    partial = str(tmp_path / "q.tbq.partial")
    calls = {"n": 0}
    orig = layerwise._Run.quantize

    def crash_after_three(self, t, h):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return orig(self, t, h)

    monkeypatch.setattr(layerwise._Run, "quantize", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        quantize_model_to_tbq(_gpt(), calib, partial_dir=partial, **kw)
    assert len([f for f in os.listdir(partial) if f.endswith(".part")]) == 3
    monkeypatch.setattr(layerwise._Run, "quantize", orig)
    redone = []
    monkeypatch.setattr(layerwise._Run, "quantize", lambda self, t, h: redone.append(t.name) or orig(self, t, h))
    got = quantize_model_to_tbq(_gpt(), calib, partial_dir=partial, **kw).data
    assert got == want
    assert len(redone) == 10 - 3  # the three finished tensors were reloaded, not redone
    # another run into the same directory is refused, not mixed in
    with pytest.raises(QuantizeRunMismatch, match="bits"):
        quantize_model_to_tbq(_gpt(), calib, partial_dir=partial, **{**kw, "bits": 3})
    # a corrupt partial result is redone
    part = os.path.join(partial, "00002.part")
    with open(part, "r+b") as f:
        f.seek(40)
        f.write(b"\xff\xff")
    assert quantize_model_to_tbq(_gpt(), calib, partial_dir=partial, **kw).data == want


# ------------------------------------------------------------------------------- refusals
def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x5A
    return bytes(b)


def test_truncated_corrupt_and_foreign_files_are_refused(tmp_path, gpt_tbq):
    _, _, tbq = gpt_tbq
    data = tbq.data
    with pytest.raises(TBQError, match="truncated"):
        parse_tbq(data[: len(data) // 2], "q.tbq")
    with pytest.raises(TBQError, match="truncated"):
        parse_tbq(data[:-1], "q.tbq")
    with pytest.raises(TBQError, match="corrupt"):
        parse_tbq(_flip(data, len(data) // 2), "q.tbq")
    with pytest.raises(TBQError, match="after its end"):
        parse_tbq(data + b"\0", "q.tbq")
    with pytest.raises(TBQError, match="not a .tbq"):
        parse_tbq(b"PK\x03\x04" + data[4:], "q.tbq")
    with pytest.raises(FileNotFoundError):
        load_tbq(str(tmp_path / "missing.tbq"))


def _rechecksum(data: bytes) -> bytes:
    return data[:-32] + hashlib.sha256(data[:-32]).digest()


@given(st.integers(min_value=0, max_value=10**9))
def test_damaged_bodies_fail_with_tbq_errors_only(pos):
    """With the checksum recomputed (a buggy writer), damage is reported as TBQError or decodes."""
    data = _TBQ_BYTES
    start = len(data) - 32 - 4000
    bad = _rechecksum(_flip(data, start + pos % 3968))
    try:
        t = parse_tbq(bad, "bad.tbq")
        t.state_dict()
    except TBQError:
        pass


_TBQ_BYTES = quantize_model_to_tbq(_gpt(), _calib(), bits=2, codebook="e8", progress=False).data


def test_another_architecture_or_dtype_is_refused(gpt_tbq):
    _, _, tbq = gpt_tbq
    with pytest.raises(TBQError, match="n_layer"):
        apply_tbq(_gpt(n_layer=1), tbq)
    with pytest.raises(TBQError, match="d_model"):
        apply_tbq(_gpt(d_model=16), tbq)
    with pytest.raises(TBQError, match="load the model in"):
        apply_tbq(_gpt().to(torch.bfloat16), tbq)


def test_bad_arguments_are_refused_with_clear_errors():
    model, calib = _gpt(), _calib()
    with pytest.raises(ValueError, match="codebook must be one of"):
        quantize_model_to_tbq(model, calib, bits=2, codebook="nf4", progress=False)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_model_to_tbq(model, calib, bits=5, codebook="uniform", progress=False)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_model_to_tbq(model, calib, bits=8, codebook="e8", progress=False)
    with pytest.raises(ValueError, match="embedding_bits: bits must be one of"):
        quantize_model_to_tbq(model, calib, bits=2, codebook="e8", embedding_bits=8, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_model_to_tbq(model, calib, bits=2, method="gptq", progress=False)
    with pytest.raises(ValueError, match="no linear layers"):
        quantize_model_to_tbq(nn.Sequential(nn.Embedding(VOCAB, 8)), calib, bits=2, progress=False)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        quantize_model_to_tbq(model, calib + VOCAB, bits=2, progress=False)
    with pytest.raises(ValueError, match="fewer than the 5,000 calibration tokens"):
        calibration_windows([np.zeros(3000, np.uint16)], 5000, 64)
    with pytest.raises(ValueError, match="non-overlapping windows"):
        calibration_windows([np.zeros(100, np.uint16)] * 3, 200, 64)
    assert torch.equal(model.blocks[0].attn.qkv.weight, _gpt().blocks[0].attn.qkv.weight)  # untouched


def test_calibration_windows_are_seeded_distinct_and_inside_files():
    files = [np.arange(1000, dtype=np.uint16), np.arange(5000, 5300, dtype=np.uint16)]
    w = calibration_windows(files, 1000, 50, seed=3)
    assert w.shape == (20, 50) and w.dtype == torch.int64
    assert torch.equal(w, calibration_windows(files, 1000, 50, seed=3))
    assert not torch.equal(w, calibration_windows(files, 1000, 50, seed=4))
    starts = {int(r[0]) for r in w}
    assert len(starts) == 20
    assert all(bool((r[1:] - r[:-1] == 1).all()) for r in w)  # contiguous: never crosses files


@given(st.lists(st.integers(0, 300), min_size=1, max_size=200), st.integers(0, 2**40))
def test_range_coder_alphabet_by_counting_equals_sorting(values, offset):
    """bounds.coding counts small value ranges instead of np.unique: same alphabet, counts, codes."""
    from tokenbounds.bounds.coding import _alphabet, decode_symbols, encode_symbols

    x = np.asarray(values, dtype=np.int64) + offset
    vals, counts, idx, dense = _alphabet(x, None)
    v2, i2, c2 = np.unique(x, return_inverse=True, return_counts=True)
    assert not dense and np.array_equal(vals, v2) and np.array_equal(counts, c2) and np.array_equal(idx, i2)
    assert np.array_equal(decode_symbols(encode_symbols(x)), x)


def test_readme_quantize_example_runs(tmp_path, monkeypatch):
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Quantizing a model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    cfg = dict(vocab_size=VOCAB, context_length=512, n_layer=1, n_head=2, d_model=16)
    model, fresh = _gpt(**cfg), _gpt(seed=1, **cfg)
    tokens = np.random.default_rng(0).integers(0, VOCAB, 12000).astype(np.uint16)
    scope = {"model": model, "fresh_model": fresh, "tokens": tokens}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["c"]["coded_bits"] == 8 * os.path.getsize(tmp_path / "q.tbq")
    _assert_same_state(fresh.state_dict(), model.state_dict())
