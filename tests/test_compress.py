"""tokenbounds.compress: Kronecker / Monarch layers, the seeded subspace projector, SubspaceModel
(alone and over a LoRA-like module), spec strings, the coded size and its exact decoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from tokenbounds.compress import (
    CodedModel,
    KroneckerLinear,
    KroneckerProjector,
    MonarchLinear,
    SubspaceModel,
    adapters,
    build_model,
    calibration_batch,
    code_parameters,
    code_subspace,
    code_trainable,
    compress_candidate,
    evaluate_loss,
    make_projector,
    parse_spec,
    replace_linears,
)
from tokenbounds.compress.kronecker import factor_pairs
from tokenbounds.compress.subspace import kron_shape
from tokenbounds.eval.train import TrainConfig, train
from tokenbounds.models.gpt import GPT, GPTConfig

SMALL = GPTConfig(vocab_size=64, context_length=16, n_layer=1, n_head=2, d_model=16)


def _tokens(n: int = 3000, vocab: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # a learnable stream: mostly "next = previous + 1 mod V", some noise, EOT (0) every 97 tokens
    ids = np.empty(n, dtype=np.uint16)
    ids[0] = 1
    for i in range(1, n):
        ids[i] = (ids[i - 1] + 1) % vocab if rng.random() < 0.8 else rng.integers(1, vocab)
    ids[::97] = 0
    return ids


# ----------------------------------------------------------------------------- Kronecker
def _kron_reference(layer: KroneckerLinear) -> torch.Tensor:
    """sum_r A_r (x) B_r by the definition W[(a,b),(c,d)] = sum_r A_r[a,c] B_r[b,d] (loops)."""
    w = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    a = layer.outer.detach().view(layer.o1, layer.rank, layer.i1)
    b = layer.inner.detach().view(layer.rank, layer.o2, layer.i2)
    for r in range(layer.rank):
        for ia in range(layer.o1):
            for ic in range(layer.i1):
                w[ia * layer.o2:(ia + 1) * layer.o2, ic * layer.i2:(ic + 1) * layer.i2] += a[ia, r, ic] * b[r]
    return w


@given(
    in_pair=st.sampled_from([(1, 3), (2, 3), (4, 2), (3, 5), (6, 4)]),
    out_pair=st.sampled_from([(1, 2), (3, 2), (2, 5), (4, 4)]),
    rank=st.integers(1, 3),
    bias=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_kronecker_matmul_equals_dense_reference(in_pair, out_pair, rank, bias, scale):
    torch.manual_seed(0)
    layer = KroneckerLinear(in_pair[0] * in_pair[1], out_pair[0] * out_pair[1], bias, rank=rank,
                            in_factors=in_pair, out_factors=out_pair).double()
    x = scale * torch.randn(3, 2, layer.in_features, dtype=torch.float64)
    w = _kron_reference(layer)
    ref = x @ w.t() + (layer.bias if bias else 0.0)
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(layer.dense_weight(), w, rtol=0, atol=1e-14)


def test_kronecker_gradcheck():
    torch.manual_seed(0)
    layer = KroneckerLinear(6, 8, rank=2, in_factors=(2, 3), out_factors=(4, 2)).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b, c: torch.func.functional_call(
        layer, {"outer": a, "inner": b, "bias": c}, (x,)), (x, layer.outer, layer.inner, layer.bias))


def test_kronecker_projection_recovers_and_is_optimal():
    torch.manual_seed(1)
    src = KroneckerLinear(12, 6, rank=2, in_factors=(3, 4), out_factors=(2, 3)).double()
    lin = nn.Linear(12, 6).double()
    with torch.no_grad():
        lin.weight.copy_(src.dense_weight())
    rec = KroneckerLinear.from_linear(lin, rank=2, in_factors=(3, 4), out_factors=(2, 3))
    torch.testing.assert_close(rec.dense_weight(), lin.weight.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(rec.bias, lin.bias)
    # full rank min(o1 i1, o2 i2) = min(6, 12) reproduces any matrix; rank 1 is no worse than any
    # other rank-1 Kronecker product (Van Loan-Pitsianis optimality; random competitors as control)
    lin2 = nn.Linear(12, 6).double()
    full = KroneckerLinear.from_linear(lin2, rank=6, in_factors=(3, 4), out_factors=(2, 3))
    torch.testing.assert_close(full.dense_weight(), lin2.weight.detach(), rtol=0, atol=1e-12)
    best = (KroneckerLinear.from_linear(lin2, rank=1, in_factors=(3, 4), out_factors=(2, 3)).dense_weight()
            - lin2.weight).norm()
    for s in range(20):
        other = KroneckerLinear(12, 6, rank=1, in_factors=(3, 4), out_factors=(2, 3),
                                generator=torch.Generator().manual_seed(s)).double()
        scale = (other.dense_weight() * lin2.weight).sum() / other.dense_weight().pow(2).sum()
        assert best <= (scale * other.dense_weight() - lin2.weight).norm() + 1e-12


def test_kronecker_bad_factors_give_clear_errors():
    with pytest.raises(ValueError, match=r"in_features factors 5 x 10 = 50 do not factor.*48.*6 x 8"):
        KroneckerLinear(48, 16, in_factors=(5, 10))
    with pytest.raises(ValueError, match="out_features=97 has no nontrivial factorization"):
        KroneckerLinear(16, 97)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        KroneckerLinear(16, 16, rank=0)
    assert KroneckerLinear(16, 97, out_factors=(1, 97)).o2 == 97  # explicit trivial factors are allowed
    assert factor_pairs(12) == [(1, 12), (2, 6), (3, 4)]


# ----------------------------------------------------------------------------- Monarch
def _monarch_reference(layer: MonarchLinear) -> torch.Tensor:
    """L_bd @ Perm @ R_bd built with torch.block_diag and an explicit permutation matrix."""
    b, k = layer.blocks, layer.inner
    r_bd = torch.block_diag(*layer.right.detach().view(b, k, -1))  # [b k, in]
    l_bd = torch.block_diag(*layer.left.detach().view(b, -1, k))  # [out, b k]
    perm = torch.zeros(b * k, b * k, dtype=torch.float64)
    for blk in range(b):
        for q in range(k):
            perm[q * b + blk, blk * k + q] = 1.0  # middle (block, q) -> position q b + block
    return l_bd @ perm @ r_bd


@given(
    blocks=st.sampled_from([1, 2, 3, 4]),
    mult_in=st.integers(1, 4),
    mult_out=st.integers(1, 4),
    extra=st.integers(0, 3),
    bias=st.booleans(),
)
def test_monarch_matmul_equals_dense_reference(blocks, mult_in, mult_out, extra, bias):
    torch.manual_seed(0)
    n_in, n_out = blocks * mult_in, blocks * mult_out
    layer = MonarchLinear(n_in, n_out, bias, blocks=blocks, inner=blocks + extra).double()
    x = torch.randn(2, 3, n_in, dtype=torch.float64)
    w = _monarch_reference(layer)
    ref = x @ w.t() + (layer.bias if bias else 0.0)
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.dense_weight(), w, rtol=0, atol=1e-14)
    # k >= b: every output depends on every input (a generic W has no structural zeros)
    assert bool((w.abs() > 0).all())


def test_monarch_square_is_dao_monarch():
    """n = m^2, b = k = m: P^T W = P L P^T R, Dao et al.'s Monarch matrix (P = reshape-transpose)."""
    torch.manual_seed(0)
    m = 3
    layer = MonarchLinear(m * m, m * m, False, blocks=m, inner=m).double()
    p = torch.zeros(m * m, m * m, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            p[j * m + i, i * m + j] = 1.0
    r_bd = torch.block_diag(*layer.right.detach().view(m, m, m))
    l_bd = torch.block_diag(*layer.left.detach().view(m, m, m))
    torch.testing.assert_close(p.t() @ layer.dense_weight(), p @ l_bd @ p.t() @ r_bd, rtol=0, atol=1e-14)


def test_monarch_gradcheck():
    torch.manual_seed(0)
    layer = MonarchLinear(6, 4, blocks=2, inner=3).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r, lft, c: torch.func.functional_call(
        layer, {"right": r, "left": lft, "bias": c}, (x,)), (x, layer.right, layer.left, layer.bias))


def test_monarch_projection_recovers_monarch_matrices():
    torch.manual_seed(2)
    for blocks, inner in ((2, 2), (2, 3), (3, 4), (4, 8)):
        src = MonarchLinear(12, 24, blocks=blocks, inner=inner).double()
        lin = nn.Linear(12, 24).double()
        with torch.no_grad():
            lin.weight.copy_(src.dense_weight())
        rec = MonarchLinear.from_linear(lin, blocks=blocks, inner=inner)
        torch.testing.assert_close(rec.dense_weight(), lin.weight.detach(), rtol=0, atol=1e-12)
    # control: a generic dense matrix is not a Monarch matrix
    lin = nn.Linear(12, 24).double()
    rec = MonarchLinear.from_linear(lin, blocks=3, inner=4)
    assert (rec.dense_weight() - lin.weight).norm() > 0.1 * lin.weight.norm()


def test_monarch_bad_shapes_give_clear_errors():
    with pytest.raises(ValueError, match=r"in_features=30 is not divisible by blocks=4.*divisors of 30"):
        MonarchLinear(30, 16, blocks=4)
    with pytest.raises(ValueError, match="out_features=18 is not divisible by blocks=4"):
        MonarchLinear(16, 18, blocks=4)
    with pytest.raises(ValueError, match="inner=2 must be an int >= blocks=4"):
        MonarchLinear(16, 16, blocks=4, inner=2)


@pytest.mark.parametrize("make", [
    lambda i, o, g: KroneckerLinear(i, o, bias=False, generator=g),
    lambda i, o, g: KroneckerLinear(i, o, bias=False, rank=3, generator=g),
    lambda i, o, g: MonarchLinear(i, o, bias=False, blocks=4, generator=g),
])
def test_init_matches_nn_linear_output_variance(make):
    """Fresh layers have nn.Linear's output variance (averaged over 40 inits, unit inputs)."""
    torch.manual_seed(0)
    x = torch.randn(512, 96)
    ours, dense = [], []
    for s in range(40):
        g = torch.Generator().manual_seed(s)
        ours.append(make(96, 48, g)(x).var().item())
        dense.append(nn.Linear(96, 48, bias=False)(x).var().item())
    ratio = np.mean(ours) / np.mean(dense)
    assert 0.85 < ratio < 1.15, ratio


# ----------------------------------------------------------------------------- swapping
def test_replace_linears_in_gpt_keeps_shapes_and_tied_head():
    torch.manual_seed(0)
    model = GPT(SMALL)
    x = torch.randint(0, 64, (2, 16))
    ref_std = model.blocks[0].mlp[0].weight.detach().pow(2).mean().sqrt().item()
    new = replace_linears(model, "kron", rank=2, seed=0)
    assert set(new) == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.0.mlp.2"}
    assert model.lm_head.weight is model.tok_emb.weight
    assert model(x).shape == (2, 16, 64)
    assert sum(p.numel() for p in model.parameters()) < SMALL.num_parameters()
    std = model.blocks[0].mlp[0].dense_weight().detach().pow(2).mean().sqrt().item()
    assert 0.3 < std / ref_std < 3.0  # "match" init: same weight RMS in expectation
    # same seed -> the same layers, bit for bit
    torch.manual_seed(0)
    again = GPT(SMALL)
    replace_linears(again, "kron", rank=2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_replace_linears_errors_name_the_layer():
    model = GPT(GPTConfig(vocab_size=64, context_length=16, n_layer=1, n_head=2, d_model=18))
    with pytest.raises(ValueError, match=r"layer 'blocks.0.attn.qkv' \(18 -> 54\).*not divisible by blocks=4"):
        replace_linears(model, "monarch", blocks=4)
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        replace_linears(model, "kron", include=["blocks.*.nope"])
    with pytest.raises(ValueError, match="lm_head.weight is tied to tok_emb.weight"):
        replace_linears(model, "kron", include=["lm_head"])
    with pytest.raises(ValueError, match="unknown structured layer kind"):
        replace_linears(model, "butterfly")


# ----------------------------------------------------------------------------- projector
def test_projector_is_reproducible_from_its_seed():
    a, b, c = (KroneckerProjector(1001, 37, seed=s) for s in (5, 5, 6))
    z = torch.randn(37, dtype=torch.float64)
    assert torch.equal(a.q1, b.q1) and torch.equal(a.q2, b.q2) and torch.equal(a(z), b(z))
    assert not torch.equal(a(z), c(z))  # control: another seed is another subspace
    d1, d2 = (make_projector("dense", 300, 20, seed=9) for _ in range(2))
    assert torch.equal(d1.p, d2.p)


@pytest.mark.parametrize("total,dim", [(20 * 30, 50), (1001, 37), (97, 97), (5000, 1)])
def test_projector_columns_are_orthonormal(total, dim):
    p = KroneckerProjector(total, dim, seed=0)
    dense = p.dense()
    assert dense.shape == (total, dim)
    gram = dense.t() @ dense
    eig = torch.linalg.eigvalsh(gram)
    assert eig.max() <= 1 + 1e-12
    if p.dropped_rows == 0:
        torch.testing.assert_close(gram, torch.eye(dim, dtype=torch.float64), rtol=0, atol=1e-12)
    else:  # P^T P = I - T^T T, T = the dropped rows of Q1 (x) Q2 restricted to the d columns
        dropped = torch.kron(p.q1, p.q2)[total:, :dim]
        assert eig.min() >= 1 - dropped.pow(2).sum() - 1e-12
        torch.testing.assert_close(gram, torch.eye(dim, dtype=torch.float64) - dropped.t() @ dropped,
                                   rtol=0, atol=1e-12)
    z = torch.randn(dim, dtype=torch.float64)
    g = torch.randn(total, dtype=torch.float64)
    torch.testing.assert_close(p.matvec(z), dense @ z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.rmatvec(g), dense.t() @ g, rtol=1e-12, atol=1e-12)


def test_projector_gradcheck():
    p = KroneckerProjector(143, 12, seed=1)  # 143 = 11 x 13
    z = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(p.matvec, (z,))


def test_kron_shape_minimizes_dropped_rows():
    assert kron_shape(54480) == (227, 240)  # 54480 = 227 x 240: none dropped
    assert kron_shape(10_000) == (100, 100)
    d1, d2 = kron_shape(1_000_003)  # prime: one row dropped
    assert d1 * d2 - 1_000_003 <= 2 and d1 <= d2


def test_projector_bad_inputs():
    with pytest.raises(ValueError, match=r"subspace dimension d=101 exceeds .* D=100; choose d <= 100"):
        KroneckerProjector(100, 101)
    with pytest.raises(ValueError, match="use projector='kron'"):
        make_projector("dense", 10**6, 10**3)
    with pytest.raises(ValueError, match="unknown projector"):
        make_projector("fastfood", 100, 10)
    with pytest.raises(ValueError, match="seed must be an int"):
        KroneckerProjector(100, 10, seed=-1)
    model = GPT(SMALL)
    with pytest.raises(ValueError, match=rf"d=100000 exceeds the number of trainable parameters D={SMALL.num_parameters()}"):
        SubspaceModel(model, 100_000)


# ----------------------------------------------------------------------------- subspace training
def test_subspace_model_trains_only_z_with_the_training_loop():
    tokens = _tokens()
    sub = build_model(SMALL, "subspace:d=200", seed=0)
    theta0 = {n: p.detach().clone() for n, p in sub.module.named_parameters()}
    assert [n for n, p in sub.named_parameters() if p.requires_grad] == ["z"]
    res = train(sub, tokens, TrainConfig(steps=40, batch_size=8, lr=0.3, warmup_steps=4), progress=False)
    assert all(torch.equal(p, theta0[n]) for n, p in sub.module.named_parameters())  # the base never moves
    assert sub.z.abs().max() > 0
    assert res.losses_nats[-1] < res.losses_nats[0] - 0.2
    plain = sub.materialize()
    assert plain.lm_head.weight is plain.tok_emb.weight  # ties survive
    x = torch.from_numpy(tokens[:33].astype(np.int64))[None]
    with torch.no_grad():
        torch.testing.assert_close(plain(x[:, :16]), sub(x[:, :16]), rtol=1e-4, atol=1e-5)
    delta = torch.cat([(p.detach() - theta0[n]).reshape(-1) for n, p in plain.named_parameters()])
    # ||theta - theta_0|| = ||P z|| = ||z||: P has orthonormal columns (D factors without dropped rows)
    assert sub.projector.dropped_rows == 0
    assert math.isclose(delta.norm().item(), sub.z.norm().item(), rel_tol=1e-3)


def test_subspace_training_resumes_from_its_checkpoint(tmp_path):
    tokens = _tokens()
    cfg = TrainConfig(steps=6, batch_size=4, lr=0.3, warmup_steps=1)
    ckpt = str(tmp_path / "ckpt.pt")
    first = build_model(SMALL, "subspace:d=64", seed=2)
    train(first, tokens, cfg, checkpoint_path=ckpt, progress=False)
    again = build_model(SMALL, "subspace:d=64", seed=2)  # a fresh process would rebuild it like this
    res = train(again, tokens, cfg, checkpoint_path=ckpt, progress=False)
    assert res.resumed_from == 6 and torch.equal(first.z, again.z)
    assert torch.equal(first.materialize().tok_emb.weight, again.materialize().tok_emb.weight)


class TinyLoRA(nn.Module):
    """A minimal LoRA adapter for the integration test: y = W0 x + b0 + B A x (W0, b0 frozen)."""

    def __init__(self, base: nn.Linear, rank: int, gen: torch.Generator):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / math.sqrt(base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


def _lora_gpt(seed: int = 0) -> GPT:
    """GPT(seed) with TinyLoRA on every untied linear; embeddings and LayerNorms stay trainable."""
    torch.manual_seed(seed)
    model = GPT(SMALL)
    gen = torch.Generator().manual_seed(seed + 1)
    replace_linears(model, lambda name, lin: TinyLoRA(lin, 2, gen))
    return model


def test_sublora_over_a_lora_module_trains_codes_and_decodes():
    """SubLoRA = subspace over the LoRA adapters and the other trainable parameters."""
    tokens = _tokens()
    model = _lora_gpt()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".base." in n for n in frozen)
    sub = SubspaceModel(model, 150, seed=11)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".a", ".b")))
    n_other = sum(p.numel() for n, p in model.named_parameters() if ".base." not in n and not n.endswith((".a", ".b")))
    assert sub.num_parameters == n_lora + n_other
    res = train(sub, tokens, TrainConfig(steps=30, batch_size=8, lr=0.3, warmup_steps=3), progress=False)
    assert res.losses_nats[-1] < res.losses_nats[0]
    code = code_subspace(sub, spec="tiny-lora:r=2+subspace:d=150", init_seed=0, bits=4,
                         arch={"tiny_lora": {"rank": 2, "gpt": "SMALL"}})
    decoded = CodedModel.decode(code.encode()).build(base=lambda: _lora_gpt(0))
    for (n, a), (_, b) in zip(code.model.named_parameters(), decoded.named_parameters(), strict=True):
        assert torch.equal(a, b), n
        if n in frozen:
            assert torch.equal(a, frozen[n])  # the frozen base is theta_0 (from the seed)
    with pytest.raises(ValueError, match="pass base="):
        CodedModel.decode(code.encode()).build()


# ----------------------------------------------------------------------------- specs and coding
def test_parse_spec_and_its_errors():
    sp = parse_spec("kron:rank=2+subspace:d=1000,projector=dense")
    assert sp.structure.kind == "kron" and sp.structure.get("rank") == 2
    assert sp.subspace.get("d") == 1000 and str(sp) == "kron:rank=2+subspace:d=1000,projector=dense"
    assert str(parse_spec("dense")) == "dense" and parse_spec("monarch:blocks=4").structure.get("blocks") == 4
    for bad, msg in [
        ("kronn", "unknown compression 'kronn'"),
        ("kron:rnk=2", r"bad option 'rnk=2' for 'kron' \(options: rank, layers"),
        ("kron:rank=two", "must be an int"),
        ("monarch:blocks=0", "must be >= 1"),
        ("subspace", "needs the option d="),
        ("subspace:d=10+kron", "subspace step must come last"),
        ("sublora:d=10", r"needs the option rank=.*'sublora:rank=4,d=2000'"),
        ("lora", "needs the option rank="),
        ("lora:rank=2+subspace:d=10", "sublora:rank=...,d=..."),
        ("kron+lora:rank=2", "LoRA wraps nn.Linear layers"),
        ("lora:rank=2,train=none|norms", "'none' cannot be combined"),
        ("lora:rank=2,targets=a||b", "empty pattern"),
        ("kron+monarch", "more than one"),
        ("", "non-empty string"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_spec(bad)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("spec", ["dense", "kron:rank=2", "monarch:blocks=2", "subspace:d=300",
                                  "monarch:blocks=2+subspace:d=100", "lora:rank=2",
                                  "lora:rank=2,train=embeddings,targets=*.mlp.*", "sublora:rank=2,d=200"])
def test_coded_round_trip_gives_identical_parameters_and_losses(spec):
    tokens = _tokens()
    model = build_model(SMALL, spec, seed=4)
    train(model, tokens, TrainConfig(steps=5, batch_size=4, lr=3e-2, warmup_steps=1), progress=False)
    sp = parse_spec(spec)
    calib = calibration_batch(tokens, 16, sequences=8)
    if sp.subspace is not None:
        code = code_subspace(model, spec=spec, init_seed=4, bits=3)
    elif sp.adapter is not None:
        code = code_trainable(model, calib, spec=spec, init_seed=4, bits=3)
    else:
        code = code_parameters(model, calib, spec=spec, init_seed=4, bits=3)
    assert not adapters(code.model)  # evaluated as the plain (merged) GPT it describes
    payload = code.encode()
    decoded = CodedModel.decode(payload).build()
    assert _same_state(code.model, decoded)
    s1 = evaluate_loss(code.model, tokens, 300, seed=1).state
    s2 = evaluate_loss(decoded, tokens, 300, seed=1).state
    assert s1.state_dict() == s2.state_dict()
    assert code.coded_bits_detail["header_bits"] > 0 and code.coded_bits > code.coded_bits_detail["header_bits"]
    # control: one changed code gives another model (the comparison above can fail)
    key = "coordinates" if payload["coordinates"] is not None else "weights"
    tampered = CodedModel.decode(payload)
    part = tampered.coordinates if key == "coordinates" else next(iter(tampered.weights.layers.values()))
    part.codes.view(-1)[0] = (part.codes.view(-1)[0] + 1) % 8
    assert not _same_state(code.model, tampered.build())


def test_subspace_code_size_counts_seeds_not_parameters():
    sub = build_model(SMALL, "subspace:d=500", seed=0)
    with torch.no_grad():
        sub.z.normal_()
    sizes = {b: code_subspace(sub, spec="subspace:d=500", init_seed=0, bits=b) for b in (2, 4, 8)}
    coords = [sizes[b].coded_bits_detail["coordinates_bits"] for b in (2, 4, 8)]
    for b, c in zip((2, 4, 8), coords, strict=True):  # <= b bits per padded coordinate + level counts + headers
        assert c <= b * 512 + 2**b * 10 + 300, (b, c)
    assert coords == sorted(coords)
    assert sizes[4].coded_bits < 0.1 * 16 * SMALL.num_parameters()  # far below coding theta itself
    assert sizes[4].header["subspace"] == {"d": 500, "projector": "kron", "seed": 2}
    assert sizes[4].checks == {"D": SMALL.num_parameters()}


def test_subspace_on_a_coded_pretrained_base():
    tokens = _tokens()
    torch.manual_seed(0)
    pre = GPT(SMALL)
    train(pre, tokens, TrainConfig(steps=5, batch_size=4, lr=3e-2, warmup_steps=1), progress=False)
    base_code = code_parameters(pre, calibration_batch(tokens, 16, sequences=8), spec="dense", init_seed=0, bits=4)
    wrong = SubspaceModel(pre, 50, seed=3)  # trained on the unquantized base: not decodable
    with pytest.raises(ValueError, match="differs from the decoded base_weights"):
        code_subspace(wrong, spec="dense", init_seed=0, base_weights=base_code.weights)
    sub = SubspaceModel(base_code.model, 50, seed=3)
    with torch.no_grad():
        sub.z.normal_()
    code = code_subspace(sub, spec="dense", init_seed=0, bits=4, base_weights=base_code.weights)
    assert code.coded_bits > base_code.weights.coded_bits  # the base's code is counted
    assert code.coded_bits_detail["base_bits"] == base_code.weights.coded_bits and code.header["base"] == "coded"
    assert _same_state(code.model, CodedModel.decode(code.encode()).build())
    payload = code.encode()
    payload["base"] = None  # a message without its base cannot pass for a seeded one
    with pytest.raises(ValueError, match="coded pretrained base"):
        CodedModel.decode(payload).build()


def test_compress_candidate_end_to_end():
    tokens = _tokens()
    tcfg = TrainConfig(steps=12, batch_size=8, lr=1e-2, warmup_steps=2)
    for spec in ("kron", "subspace:d=100"):
        cand = compress_candidate(spec, SMALL, tokens, tcfg, seed=1, bits=4)
        assert cand.coded_bits > 0 and not cand.model.training
        assert cand.trained.num_trained == (100 if "subspace" in spec else
                                            sum(p.numel() for p in cand.trained.model.parameters()))
        if "subspace" in spec:
            assert cand.trained.train_config.lr > tcfg.lr  # the subspace learning-rate rule
        stats = evaluate_loss(cand.model, tokens, 200, seed=2).stats
        assert math.isfinite(stats.mean_nll_bits)


# ----------------------------------------------------------------------------- LoRA / SubLoRA specs
def _trainable(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_specs_train_only_the_adapters_on_the_seeded_init():
    lora = build_model(SMALL, "lora:rank=2", seed=3)
    names = _trainable(lora)
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    # every untied linear wrapped: r (in + out) values each
    expected = sum(2 * (m.in_features + m.out_features) for m in adapters(lora).values())
    assert sum(names.values()) == expected and len(adapters(lora)) == 4
    # the frozen base is the plain GPT of the same seed: it costs the seed
    plain = build_model(SMALL, "dense", seed=3)
    frozen = {n.replace(".base.", "."): p for n, p in lora.named_parameters() if not p.requires_grad}
    for n, p in plain.named_parameters():
        assert torch.equal(frozen[n], p), n
    emb = build_model(SMALL, "lora:rank=2,train=embeddings|norms", seed=3)
    extra = set(_trainable(emb)) - set(names)
    assert "tok_emb.weight" in extra and "pos_emb.weight" in extra and "ln_f.weight" in extra
    sub = build_model(SMALL, "sublora:rank=2,d=100", seed=3)  # default train=embeddings|norms|biases
    assert isinstance(sub, SubspaceModel) and sub.dim == 100
    assert {"tok_emb.weight", "blocks.0.attn.qkv.base.bias"} <= set(sub.names)
    assert not any(n.endswith(".base.weight") for n in sub.names)


def test_sublora_is_reproducible_from_its_seed():
    a, b, c = (build_model(SMALL, "sublora:rank=2,d=100", seed=s) for s in (7, 7, 8))
    assert torch.equal(a.projector.q1, b.projector.q1) and torch.equal(a.projector.q2, b.projector.q2)
    z = torch.randn(100)
    ta, tb, tc = (m.materialize(z).state_dict() for m in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)  # control: another seed, another model


def test_lora_code_counts_the_adapters_not_the_base():
    tokens = _tokens()
    calib = calibration_batch(tokens, 16, sequences=8)
    model = build_model(SMALL, "lora:rank=2", seed=0)
    with torch.no_grad():
        for a in adapters(model).values():
            a.lora_B.normal_(0.0, 0.1)
    code = code_trainable(model, calib, spec="lora:rank=2", init_seed=0, bits=4)
    n_adapters = sum(_trainable(model).values())
    w = code.coded_bits_detail["weights_bits"]
    assert 4 * n_adapters <= w <= 4 * n_adapters + 16 * 64 * 8 + 2000  # codes + fp16 scales + headers
    dense = build_model(SMALL, "dense", seed=0)
    dense_bits = code_parameters(dense, calib, spec="dense", init_seed=0, bits=4).coded_bits
    assert w < 0.35 * dense_bits and code.coded_bits_detail["base_bits"] == 0
    # the coded model is W0 + B A of the decoded factors, with the frozen W0 from the seed
    assert not torch.equal(code.model.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)
    assert torch.equal(code.model.tok_emb.weight, dense.tok_emb.weight)
    # control: a frozen value the seed does not give cannot be decoded
    with torch.no_grad():
        model.blocks[0].mlp[0].base.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="differs from the seeded init at seed 0"):
        code_trainable(model, calib, spec="lora:rank=2", init_seed=0)
    with pytest.raises(ValueError, match="codes 'lora:...' specs"):
        code_trainable(model, calib, spec="kron", init_seed=0)


def test_lora_and_sublora_on_a_coded_pretrained_base():
    tokens = _tokens()
    calib = calibration_batch(tokens, 16, sequences=8)
    tcfg = TrainConfig(steps=6, batch_size=4, lr=3e-2, warmup_steps=1)
    pre = build_model(SMALL, "dense", seed=0)
    train(pre, tokens, tcfg, progress=False)
    base = code_parameters(pre, calib, spec="dense", init_seed=0, bits=4).weights
    for spec in ("lora:rank=2", "sublora:rank=2,d=100"):
        cand = compress_candidate(spec, SMALL, tokens, tcfg, seed=5, bits=4, base_weights=base)
        d = cand.code.coded_bits_detail
        assert d["base_bits"] == base.coded_bits and cand.coded_bits > base.coded_bits  # the base is paid
        assert cand.code.header["base"] == "coded"
        decoded = CodedModel.decode(cand.code.encode()).build()
        assert _same_state(cand.model, decoded)
        seeded = CodedModel.decode({**cand.code.encode(), "base": None,
                                    "header": {k: v for k, v in cand.code.header.items() if k != "base"}}).build()
        assert not _same_state(seeded, decoded)  # control: the base matters to the decoded model
    with pytest.raises(ValueError, match="base_weights do not fit"):
        build_model(SMALL, "kron", seed=0, base_weights=base)
    with pytest.raises(ValueError, match="trains on the pretrained base 'ptq4': pass its code as base_weights"):
        compress_candidate("lora:rank=2,base=ptq4", SMALL, tokens, tcfg)
    named = compress_candidate("lora:rank=2,base=ptq4", SMALL, tokens, tcfg, seed=5, base_weights=base)
    payload = named.code.encode()
    assert _same_state(named.model, CodedModel.decode(payload).build())
    with pytest.raises(ValueError, match="coded pretrained base"):  # the spec says a base must be there
        CodedModel.decode({**payload, "base": None, "header": {k: v for k, v in payload["header"].items()
                                                              if k != "base"}}).build()


def test_lora_sublora_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match=r"rank 17 exceeds min\(in_features, out_features\) = min\(16, 48\)"):
        build_model(SMALL, "lora:rank=17", seed=0)
    with pytest.raises(ValueError, match=r"subspace dimension d=10000000 exceeds .* D=.*LoRA adapter values"):
        build_model(SMALL, "sublora:rank=2,d=10000000", seed=0)
    with pytest.raises(ValueError, match=r"targets \['\*.nope'\]"):
        build_model(SMALL, "lora:rank=2,targets=*.mlp.*|*.nope", seed=0)
    with pytest.raises(ValueError, match="train item 'norm' names no parameter"):
        build_model(SMALL, "lora:rank=2,train=norm", seed=0)
    with pytest.raises(ValueError, match="unknown compression 'qlora'"):
        build_model(SMALL, "qlora:rank=2", seed=0)
    with pytest.raises(ValueError, match="option rank='0'|must be > 0|>= 1"):
        build_model(SMALL, "lora:rank=0", seed=0)
