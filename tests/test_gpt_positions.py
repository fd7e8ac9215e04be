"""Position encodings of tokenbounds.models.gpt.GPT (learned, RoPE, ALiBi, none) against the
float64 oracle in reference.py, inside and beyond the training length."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tokenbounds.models.gpt import (
    GPT,
    POSITION_ENCODINGS,
    GPTConfig,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    rope_cos_sin,
)
from tokenbounds.reference import gpt_forward_reference

T = 12  # training length of the test models
EXTRAPOLATING = ("rope", "alibi", "none")


def make_model(enc: str, n_head: int = 3, seed: int = 0) -> GPT:
    """A tiny GPT with weights large enough (std 0.3, not the 0.02 init) that attention is far
    from uniform, so a wrong position encoding changes the logits visibly."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=23, context_length=T, n_layer=2, n_head=n_head, d_model=8 * n_head,
                    position_encoding=enc)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def lengths_for(enc: str) -> list[int]:
    return [1, 5, T] if enc == "learned" else [1, 5, T, 2 * T, 4 * T]


@pytest.mark.parametrize("enc", POSITION_ENCODINGS)
@pytest.mark.parametrize("n_head", [2, 3])
def test_forward_matches_the_float64_reference(enc, n_head):
    model = make_model(enc, n_head)
    for t in lengths_for(enc):
        x = torch.randint(0, 23, (2, t), generator=torch.Generator().manual_seed(t))
        ref = gpt_forward_reference(model.state_dict(), model.config, x)
        with torch.no_grad():
            out32 = model(x)
            out64 = model.double()(x)
        model.float()
        assert out32.dtype == torch.float32 and out64.dtype == torch.float64
        scale = float(ref.abs().max())
        assert float((out32.double() - ref).abs().max()) <= 2e-6 * max(1.0, scale), (enc, t)
        assert float((out64 - ref).abs().max()) <= 1e-12 * max(1.0, scale), (enc, t)


@pytest.mark.parametrize("enc", EXTRAPOLATING)
def test_reference_comparison_detects_a_wrong_encoding(enc):
    """Negative control: the oracle with another encoding is far from the model, so the
    comparison above can fail."""
    model = make_model(enc)
    x = torch.randint(0, 23, (2, 2 * T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.double()(x)
    for other in EXTRAPOLATING:
        if other != enc:
            wrong = gpt_forward_reference(model.state_dict(), {**model.config.to_dict(), "position_encoding": other}, x)
            assert float((out - wrong).abs().max()) > 1e-3, (enc, other)


@pytest.mark.parametrize("enc", EXTRAPOLATING)
def test_long_inputs_stay_causal(enc):
    """Beyond T the prefix logits of a 4T input equal those of the prefix alone."""
    model = make_model(enc).double()
    x = torch.randint(0, 23, (2, 4 * T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        for t in (3, T, 2 * T + 1):
            torch.testing.assert_close(model(x[:, :t]), full[:, :t], rtol=0, atol=1e-12)
    assert model.max_length is None
    assert model.hidden_states(x).shape == (2, 4 * T, model.config.d_model)


def test_learned_positions_refuse_longer_inputs_and_say_why():
    model = make_model("learned")
    assert model.max_length == T
    model(torch.zeros(1, T, dtype=torch.long))  # T itself is fine
    with pytest.raises(ValueError, match=r"sequence length 13 exceeds context_length 12.*learned absolute"
                       r".*lengths <= 12.*position_encoding='rope'"):
        model(torch.zeros(1, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="learned absolute"):
        model.hidden_states(torch.zeros(1, 4 * T, dtype=torch.long))


def test_rope_scores_depend_only_on_relative_position():
    """(R_i q) . (R_j k) = q^T R_{j-i} k (Su et al. 2021, eq. 16): the same for (i + s, j + s)."""
    g = torch.Generator().manual_seed(3)
    head_dim, n = 16, 64
    q, k = torch.randn(head_dim, generator=g, dtype=torch.float64), torch.randn(head_dim, generator=g, dtype=torch.float64)
    cos, sin = rope_cos_sin(n, head_dim, torch.float64)
    rq = apply_rope(q.expand(n, head_dim), cos, sin)  # q at every position
    rk = apply_rope(k.expand(n, head_dim), cos, sin)
    scores = rq @ rk.T  # scores[i, j]
    for shift in (1, 7, 30):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift], rtol=0, atol=1e-12)
    # rotations keep norms, position 0 is the identity, and the offset does matter (control)
    torch.testing.assert_close(rq.norm(dim=1), q.norm().expand(n), rtol=0, atol=1e-12)
    torch.testing.assert_close(rq[0], q, rtol=0, atol=0)
    diagonals = torch.stack([scores.diagonal(o)[0] for o in range(8)])
    assert float(diagonals.max() - diagonals.min()) > 1e-2
    # float32 tables at long lengths: angles are computed in float64 before the cast
    c32, s32 = rope_cos_sin(4096, head_dim, torch.float32)
    c64, s64 = rope_cos_sin(4096, head_dim, torch.float64)
    assert float((c32.double() - c64).abs().max()) < 1e-7 and float((s32.double() - s64).abs().max()) < 1e-7


def test_alibi_slopes_follow_press_et_al():
    """Powers of two: 2^(-8h/n). Others: the slopes of the largest power of two below, then the
    odd-indexed slopes of twice that (Press et al. 2022, section 3 and their footnote)."""
    assert alibi_slopes(8) == [2.0 ** -h for h in range(1, 9)]
    assert alibi_slopes(4) == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]
    assert alibi_slopes(1) == [2.0 ** -8]
    assert alibi_slopes(2) == [2.0 ** -4, 2.0 ** -8]
    assert alibi_slopes(6) == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    assert alibi_slopes(3) == [2.0 ** -4, 2.0 ** -8, 2.0 ** -2]
    twelve = alibi_slopes(12)
    assert twelve[:8] == [2.0 ** -h for h in range(1, 9)]
    assert twelve[8:] == pytest.approx([2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5], rel=1e-15)
    for n in range(1, 33):
        s = alibi_slopes(n)
        assert len(s) == len(set(s)) == n and all(0 < m < 1 for m in s)
    with pytest.raises(ValueError, match="n_head must be >= 1"):
        alibi_slopes(0)


def test_alibi_bias_is_linear_in_distance_and_causal():
    slopes = torch.tensor(alibi_slopes(3), dtype=torch.float64)
    bias = alibi_bias(slopes, 6)
    for h in range(3):
        for i in range(6):
            for j in range(6):
                expected = -slopes[h].item() * (i - j) if j <= i else float("-inf")
                assert bias[h, i, j].item() == expected


@pytest.mark.parametrize("enc", ["rope", "alibi"])
def test_bf16_autocast_runs(enc):
    model = make_model(enc)
    x = torch.randint(0, 23, (2, 2 * T))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    ref = gpt_forward_reference(model.state_dict(), model.config, x)
    assert float((out.double() - ref).abs().max()) < 0.1 * float(ref.abs().max())


def test_config_validation():
    with pytest.raises(ValueError, match=r"position_encoding='sinusoidal' is not one of"):
        GPTConfig(position_encoding="sinusoidal")
    with pytest.raises(ValueError, match="head dimension d_model/n_head = 3 must be even"):
        GPTConfig(d_model=12, n_head=4, position_encoding="rope")
    GPTConfig(d_model=12, n_head=4, position_encoding="alibi")  # odd head dims are fine there
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(d_model=10, n_head=4)


@pytest.mark.parametrize("enc", POSITION_ENCODINGS)
def test_parameter_count_and_save_load_round_trip(enc, tmp_path):
    model = make_model(enc)
    assert model.config.num_parameters() == sum(p.numel() for p in model.parameters())
    assert ("pos_emb.weight" in model.state_dict()) == (enc == "learned")
    model.save(str(tmp_path))
    with open(os.path.join(tmp_path, "config.json")) as f:
        saved = json.load(f)
    # learned-position configs are written exactly as before the field existed
    assert ("position_encoding" in saved) == (enc != "learned")
    back = GPT.load(str(tmp_path)).eval()
    assert back.config == model.config
    x = torch.randint(0, 23, (2, T))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_old_config_without_the_field_loads_as_learned(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=31, context_length=8, n_layer=1, n_head=2, d_model=8)).eval()
    old = {"model_type": "tokenbounds-gpt", "vocab_size": 31, "context_length": 8, "n_layer": 1,
           "n_head": 2, "d_model": 8, "dropout": 0.0, "tie_embeddings": True}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(old, f, indent=1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    back = GPT.load(str(tmp_path))
    assert back.config.position_encoding == "learned"
    x = torch.randint(0, 31, (3, 8))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    back.save(str(tmp_path / "again"))
    with open(tmp_path / "again" / "config.json") as f:
        assert json.load(f) == old
