"""tokenbounds.quant: E8 decoder, codebooks, LDLQ vs RTN, coded size, model round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from tokenbounds.bounds.coding import message_length_bits
from tokenbounds.quant import (
    QuantizedModel,
    QuantizedWeight,
    collect_hessians,
    quantize_model,
    quantize_weight,
)
from tokenbounds.quant.codebooks import (
    e8_from_streams,
    e8_nearest,
    e8_to_streams,
    uniform_quantize,
    unzigzag,
    zigzag,
)
from tokenbounds.quant.model import HessianAccumulator
from tokenbounds.quant.weight import proxy_loss
from tokenbounds.reference import e8_nearest_reference


def correlated_layer(out=32, inp=64, seed=0, outliers=4):
    """W [out, in] and H = E[x x^T] with low-rank correlated inputs and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    r = max(2, inp // 8)
    a = torch.randn(inp, r, generator=g, dtype=torch.float64) @ torch.randn(r, inp, generator=g, dtype=torch.float64)
    a = a / math.sqrt(r) + 0.05 * torch.eye(inp, dtype=torch.float64)
    x = torch.randn(8 * inp, inp, generator=g, dtype=torch.float64) @ a
    x[:, torch.randperm(inp, generator=g)[:outliers]] *= 10
    h = x.T @ x / x.shape[0]
    w = torch.randn(out, inp, generator=g) * 0.05
    return w, h


def _in_e8(p: torch.Tensor) -> torch.Tensor:
    y = p * 2
    integral = torch.all(y == torch.round(y), -1)
    same_parity = torch.all(torch.remainder(y - y[..., :1], 2) == 0, -1)
    even_sum = torch.remainder(p.sum(-1), 2) == 0
    return integral & same_parity & even_sum


# ------------------------------------------------------------------------------------ E8
@pytest.mark.parametrize("spread", [0.3, 1.0, 5.0])
def test_e8_decoder_matches_brute_force(spread):
    x = torch.randn(3000, 8, generator=torch.Generator().manual_seed(int(spread * 10)), dtype=torch.float64) * spread
    fast = e8_nearest(x)
    slow = e8_nearest_reference(x)
    assert bool(_in_e8(fast).all())
    d_fast = ((x - fast) ** 2).sum(-1)
    d_slow = ((x - slow) ** 2).sum(-1)
    torch.testing.assert_close(d_fast, d_slow, rtol=0, atol=1e-12)
    # covering radius of E8 is 1: no point is farther than that
    assert float(d_fast.max()) <= 1.0 + 1e-12


@given(st.lists(st.floats(-6, 6, allow_nan=False), min_size=8, max_size=8))
def test_e8_decoder_property(coords):
    x = torch.tensor([coords], dtype=torch.float64)
    p = e8_nearest(x)
    assert bool(_in_e8(p).all())
    d = float(((x - p) ** 2).sum())
    assert d <= float(((x - e8_nearest_reference(x)) ** 2).sum()) + 1e-12
    # lattice points decode to themselves
    torch.testing.assert_close(e8_nearest(p), p, rtol=0, atol=0)


def test_e8_streams_round_trip_and_zigzag():
    pts = e8_nearest(torch.randn(500, 8, dtype=torch.float64) * 3)
    c, z7, w = e8_to_streams(pts)
    assert c.shape == (500,) and z7.shape == (3500,) and w.shape == (500,)
    assert min(c.min(), z7.min(), w.min()) >= 0
    torch.testing.assert_close(e8_from_streams(c, z7, w), pts, rtol=0, atol=0)
    v = np.arange(-5, 6)
    np.testing.assert_array_equal(unzigzag(zigzag(v)), v)
    assert sorted(zigzag(v).tolist()) == list(range(11))


def test_uniform_grid_is_nearest():
    s = torch.tensor([[0.1], [0.5]], dtype=torch.float64)
    x = torch.linspace(-1, 1, 201, dtype=torch.float64).expand(2, -1)
    for bits in (2, 3, 4, 8):
        v, c = uniform_quantize(x, s, bits)
        L = 2**bits
        assert int(c.min()) >= 0 and int(c.max()) <= L - 1
        grid = (torch.arange(L, dtype=torch.float64) - (L - 1) / 2)[None, None, :] * s[..., None]
        best = (x[..., None] - grid).abs().min(-1).values
        torch.testing.assert_close((x - v).abs(), best, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------- quantize_weight
@pytest.mark.parametrize("codebook,bits", [("uniform", 2), ("uniform", 3), ("e8", 2)])
@pytest.mark.parametrize("incoherence", [False, True])
def test_ldlq_beats_rtn_on_correlated_inputs(codebook, bits, incoherence):
    w, h = correlated_layer(seed=bits)
    kw = dict(bits=bits, codebook=codebook, incoherence=incoherence, seed=3)
    q_rtn = quantize_weight(w, h, method="rtn", **kw)
    q_ldlq = quantize_weight(w, h, method="ldlq", **kw)
    assert q_ldlq.proxy_loss < q_rtn.proxy_loss
    # quantize_weight evaluates the proxy with a float32 copy of H (float32 Gram products)
    assert q_ldlq.proxy_loss == pytest.approx(proxy_loss(w, q_ldlq.dequantize(), h), rel=1e-5)
    assert q_ldlq.dequantize().shape == w.shape and q_ldlq.dequantize().dtype == w.dtype


def test_incoherence_and_e8_help_at_two_bits():
    w, h = correlated_layer(out=64, inp=128, seed=5, outliers=6)
    plain = quantize_weight(w, h, bits=2, method="ldlq", incoherence=False).proxy_loss
    rot = quantize_weight(w, h, bits=2, method="ldlq", incoherence=True).proxy_loss
    e8 = quantize_weight(w, h, bits=2, codebook="e8", method="ldlq", incoherence=True)
    assert rot < plain
    assert e8.proxy_loss < rot
    assert 1.8 < e8.bits_per_weight < 2.6  # the E8 scale targets ~2 bits of entropy per weight


def test_eight_bits_is_nearly_lossless_and_identity_hessian():
    w = torch.randn(16, 24)
    q = quantize_weight(w, bits=8, method="rtn", incoherence=False)
    assert q.proxy_loss < 1e-4
    # without a Hessian the proxy loss is the relative squared error
    rel = float(((q.dequantize().double() - w.double()) ** 2).sum() / (w.double() ** 2).sum())
    assert q.proxy_loss == pytest.approx(rel, rel=1e-9)


@pytest.mark.parametrize("codebook", ["uniform", "e8"])
@pytest.mark.parametrize("shape", [(10, 13), (7, 40), (3, 8)])
def test_odd_shapes_are_padded(codebook, shape):
    w = torch.randn(*shape)
    h = torch.eye(shape[1], dtype=torch.float64) + 0.1
    for inc in (False, True):
        q = quantize_weight(w, h, bits=2, codebook=codebook, incoherence=inc)
        assert q.dequantize().shape == shape
        assert q.padded_shape[0] >= shape[0] and q.padded_shape[1] >= shape[1]
        assert math.isfinite(q.proxy_loss) and q.proxy_loss < 1.0


def test_group_scales_and_dead_inputs():
    w, h = correlated_layer(out=16, inp=64, seed=2)
    h[:, 5] = 0
    h[5, :] = 0  # a dead input channel
    per_row = quantize_weight(w, h, bits=3, incoherence=False)
    grouped = quantize_weight(w, h, bits=3, incoherence=False, group_size=16)
    assert grouped.scales.shape == (16, 4) and per_row.scales.shape == (16, 1)
    assert grouped.coded_bits > per_row.coded_bits - 1  # more scales to pay for
    assert math.isfinite(grouped.proxy_loss)


@pytest.mark.parametrize("codebook,bits", [("uniform", 4), ("e8", 2)])
def test_coded_bits_are_exact_and_decode_bit_exactly(codebook, bits):
    w, h = correlated_layer(out=24, inp=48, seed=7)
    q = quantize_weight(w, h, bits=bits, codebook=codebook, seed=11)
    payload = q.encode()
    # the coded size is the range coder's output plus the side information, stream by stream
    stream_bits = 0.0
    for name, enc in payload["streams"].items():
        sym, levels = q.symbol_streams()[name]
        ml = message_length_bits(sym, num_levels=levels, codebook_bits_per_entry=0)
        assert ml.payload_bits == enc.payload_bits
        stream_bits += ml.total_bits
        # within a few 32-bit words of the entropy (+ the counts table)
        assert ml.payload_bits <= ml.entropy_bits + 64
    assert q.coded_bits == pytest.approx(stream_bits + 16 * q.scales.numel() + q.coded_bits_detail["header_bits"])
    back = QuantizedWeight.decode(payload)
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(weight=torch.ones(4)), ValueError, "2-D"),
        (dict(weight=torch.ones(4, 4, dtype=torch.int64)), TypeError, "floating"),
        (dict(hessian=torch.eye(3)), ValueError, r"\[4, 4\]"),
        (dict(hessian=torch.full((4, 4), float("nan"))), ValueError, "NaN"),
        (dict(bits=5), ValueError, "bits"),
        (dict(bits=8, codebook="e8"), ValueError, "bits"),
        (dict(codebook="e8p"), ValueError, "codebook"),
        (dict(method="gptq"), ValueError, "method"),
        (dict(group_size=0), ValueError, "group_size"),
        (dict(group_size=4, codebook="e8"), ValueError, "group_size"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(damp=2.0), ValueError, "damp"),
    ],
)
def test_quantize_weight_validation(kwargs, exc, match):
    args = dict(weight=torch.randn(4, 4), hessian=None)
    args.update(kwargs)
    w = args.pop("weight")
    h = args.pop("hessian")
    with pytest.raises(exc, match=match):
        quantize_weight(w, h, **args)


# ------------------------------------------------------------------------- quantize_model
class QKV(nn.Module):
    """Three projections reading one tensor (as in Hugging Face attention) + an MLP."""

    def __init__(self, d=16, vocab=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        return self.out(self.q(x) * self.k(x) + self.v(x))


def test_hessians_are_shared_and_streamed():
    torch.manual_seed(0)
    m = QKV()
    toks = torch.randint(0, 32, (6, 5))
    hs, owner = collect_hessians(m, [toks[:2], toks[2:]])
    assert owner["k"] == owner["q"] == owner["v"] == "q" and owner["out"] == "out"
    x = m.emb(toks).detach().reshape(-1, 16).double()
    torch.testing.assert_close(hs["q"], x.T @ x / x.shape[0])
    acc = HessianAccumulator(3)
    acc.update(torch.ones(2, 3))
    acc.update(torch.zeros(2, 3))
    torch.testing.assert_close(acc.hessian, torch.full((3, 3), 0.5, dtype=torch.float64))


def _tiny_gpt(train_steps: int):
    from tokenbounds.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, context_length=32, n_layer=2, n_head=2, d_model=32)
    model = GPT(cfg)
    # a deterministic-ish synthetic language: next token = (3 * prev + noise) mod V
    g = torch.Generator().manual_seed(0)

    def batch(b=16):
        start = torch.randint(0, 32, (b, 1), generator=g)
        noise = (torch.rand(b, 32, generator=g) < 0.1).long() * torch.randint(0, 32, (b, 32), generator=g)
        seq = [start[:, 0]]
        for t in range(1, 33):
            seq.append((3 * seq[-1] + 1 + noise[:, t - 1]) % 32)
        s = torch.stack(seq, 1)
        return s[:, :-1], s[:, 1:]

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(train_steps):
        x, y = batch()
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), batch


def _bits_per_token(model, x, y):
    from tokenbounds import smoothed_nll

    with torch.no_grad():
        logits = model(x)
    return float(smoothed_nll(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), [1e-3]).nll_bits.mean())


def test_quantized_gpt_round_trip_and_loss_gap():
    model, batch = _tiny_gpt(train_steps=80)
    calib, _ = batch(8)
    x, y = batch(32)
    base = _bits_per_token(model, x, y)
    assert base < 2.0  # it learned something (uniform would be 5 bits)
    qm = quantize_model(model, calib, bits=4, progress=False)
    assert "lm_head.weight" in qm.layers and qm.tied == {"tok_emb.weight": "lm_head.weight"}
    assert set(qm.dequantized_state_dict()) == set(model.state_dict())
    # stated limit: 4-bit LDLQ + incoherence loses < 0.05 bits/token on this model (measured 0.012)
    gap = _bits_per_token(qm.dequantized_model(model), x, y) - base
    assert gap < 0.05, gap
    # exact decode of the whole message
    back = QuantizedModel.decode(qm.encode())
    a, b = qm.dequantized_state_dict(), back.dequantized_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    s = qm.summary()
    assert s["coded_bits"] == pytest.approx(s["quantized_bits"] + s["unquantized_bits"] + s["header_bits"])
    assert 4.0 < s["bits_per_quantized_weight"] < 5.0
    # the original model is untouched by dequantized_model
    assert _bits_per_token(model, x, y) == base


def test_transposed_layers_survive_encode_decode_and_compaction():
    # GPT-2 Conv1D weights are coded as [out, in] and stored [in, out]: the set of transposed layers
    # is part of the message, and every rebuild of a QuantizedModel keeps it
    from tokenbounds.quant.embedding import compact_unquantized

    torch.manual_seed(0)
    w = torch.randn(8, 24)
    q = quantize_weight(w, torch.eye(24), bits=4, method="rtn", codebook="uniform", incoherence=False)
    qm = QuantizedModel(layers={"c.weight": q}, unquantized={"c.bias": torch.zeros(8)}, transposed={"c.weight"})
    want = qm.dequantized_state_dict()
    assert want["c.weight"].shape == (24, 8)
    for rebuilt in (QuantizedModel.decode(qm.encode()), compact_unquantized(qm)):
        got = rebuilt.dequantized_state_dict()
        assert got["c.weight"].shape == (24, 8) and torch.equal(got["c.weight"], want["c.weight"])
    # a negative control: without the set the decoded weight has the wrong layout
    assert QuantizedModel(layers=qm.layers, unquantized=qm.unquantized).dequantized_state_dict()["c.weight"].shape == (8, 24)


def test_quantize_model_rtn_e8_and_skip():
    torch.manual_seed(1)
    m = QKV()
    toks = torch.randint(0, 32, (4, 8))
    qm = quantize_model(m, toks, bits=2, codebook="e8", method="rtn", skip=["out"], progress=False)
    assert set(qm.layers) == {"q.weight", "k.weight", "v.weight"}
    assert "out.weight" in qm.unquantized and "emb.weight" in qm.unquantized
    assert qm.coded_bits_detail["unquantized_bits"] == 32 * sum(
        t.numel() for n, t in m.state_dict().items() if n not in qm.layers)
    m2 = qm.load_into(QKV())
    assert torch.equal(m2.out.weight, m.out.weight)


def test_hessians_are_not_shared_through_a_reused_address():
    """Regression: a freed layer input's memory can hold the next layer's input (same address,
    shape and strides); collect_hessians took them for one tensor and gave mlp.0 the H of proj."""
    from tokenbounds.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2, d_model=16)).eval()
    _, owner = collect_hessians(model, torch.randint(0, 64, (8, 16)))
    assert all(owner[n] == n for n in owner), owner
