"""tokenbounds.hessian against exact oracles (torch.func.hessian + eigvalsh) on <= 1000 parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from tokenbounds import reference
from tokenbounds.hessian import (
    DenseOperator,
    Estimate,
    GaussNewton,
    ModelHessian,
    ProxyHessian,
    collect_proxy_hessians,
    format_table,
    hutchinson_trace,
    hutchpp_trace,
    quip_link_table,
    slq_trace,
    spectral_density,
    sqrt_trace_stats,
)
from tokenbounds.hessian.operators import _sdpa_math
from tokenbounds.models.gpt import GPT, GPTConfig

VOCAB = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every operator here is <= 348 wide, so a second OpenMP thread only adds a barrier per op;
    on a shared 2-core machine that barrier waits for a descheduled thread (17x slower suite)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trained_gpt() -> tuple[GPT, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, context_length=8, n_layer=1, n_head=2, d_model=4))
    tokens = torch.randint(0, VOCAB, (8, 9), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), 3e-2)
    for _ in range(25):  # away from initialization: an indefinite Hessian with outliers
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double(), tokens


def _flat_loss(op: ModelHessian, model: nn.Module, tokens: torch.Tensor):
    def f(flat):
        theta = op._param_dict([c.view_as(p) for c, p in zip(torch.split(flat, op.sizes), op.params, strict=True)])
        logits = torch.func.functional_call(model, theta, (tokens[:, :-1],))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    return f


@pytest.fixture(scope="module")
def gpt_case():
    model, tokens = _trained_gpt()
    op = ModelHessian(model, tokens, probe_block=8)
    assert op.shape[0] <= 1000
    with _sdpa_math():
        H = reference.exact_hessian_reference(_flat_loss(op, model, tokens), torch.cat([p.reshape(-1) for p in op.params]))
    return model, tokens, op, H


@pytest.fixture(scope="module")
def exact_h(gpt_case):
    return gpt_case[3]


def _within(est: Estimate, exact: float, k: float = 3.0):
    assert math.isfinite(est.stderr) and est.stderr >= 0
    assert abs(est.value - exact) <= k * est.stderr + 1e-9 * abs(exact), (est, exact)


# ----------------------------------------------------------------------------- operators
def test_oracle_matches_finite_differences(gpt_case):
    model, tokens, op, H = gpt_case
    f = _flat_loss(op, model, tokens)
    p0 = torch.cat([p.detach().reshape(-1) for p in op.params])
    eps = 1e-6
    for col in (0, 96, op.shape[0] - 5):  # embedding, LayerNorm, final LayerNorm
        e = torch.zeros_like(p0)
        e[col] = eps
        with _sdpa_math():
            fd = (torch.func.grad(f)(p0 + e) - torch.func.grad(f)(p0 - e)) / (2 * eps)
        torch.testing.assert_close(H[:, col], fd, rtol=1e-5, atol=1e-6)


def test_hvp_autograd_matches_exact(gpt_case):
    model, tokens, op, H = gpt_case
    V = torch.randn(H.shape[0], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(op.matvec(V[:, 0]), H @ V[:, 0], rtol=1e-7, atol=1e-8)
    loop = ModelHessian(model, tokens, probe_block=1)
    torch.testing.assert_close(loop.matmat(V), H @ V, rtol=1e-7, atol=1e-8)


def test_hvp_func_matches_exact(gpt_case):
    model, tokens, _, H = gpt_case
    op = ModelHessian(model, tokens, method="func", probe_block=3)
    V = torch.randn(H.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-7, atol=1e-8)


def test_hvp_multiple_batches_average(gpt_case):
    model, tokens, op, H = gpt_case
    two = ModelHessian(model, [tokens[:4], tokens[4:]])
    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = 0.5 * (ModelHessian(model, tokens[:4]).matmat(V) + ModelHessian(model, tokens[4:]).matmat(V))
    torch.testing.assert_close(two.matmat(V), ref)


def test_gauss_newton_is_exact_ggn(gpt_case):
    model, tokens, op, _ = gpt_case
    tokens = tokens[:2]  # 16 tokens x 16 classes: a cheap explicit Jacobian
    ggn = GaussNewton(model, tokens, probe_block=4)
    n = ggn.shape[0]
    flat0 = torch.cat([p.detach().reshape(-1) for p in op.params])

    def logits_of(flat):
        theta = op._param_dict([c.view_as(p) for c, p in zip(torch.split(flat, op.sizes), op.params, strict=True)])
        return torch.func.functional_call(model, theta, (tokens[:, :-1],)).reshape(-1, VOCAB)

    with _sdpa_math():
        J = torch.func.jacrev(logits_of)(flat0)  # [N, V, n]
    p = torch.softmax(logits_of(flat0).detach(), -1)
    N = p.shape[0]
    Hout = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / N
    G = torch.einsum("tvn,tvw,twm->nm", J, Hout, J)
    V = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ggn.matmat(V), G @ V, rtol=1e-7, atol=1e-9)
    assert ggn.quadratic_path == "taylor"  # (J z)^T H_out (J z) by first-order forward mode
    torch.testing.assert_close(ggn.quadratic_forms(V), ((G @ V) * V).sum(0), rtol=1e-10, atol=1e-12)
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-10


def test_operator_validation(gpt_case):
    model, tokens, op, _ = gpt_case
    with pytest.raises(ValueError, match="method"):
        ModelHessian(model, tokens, method="bogus")
    with pytest.raises(ValueError, match="probe_block"):
        ModelHessian(model, tokens, probe_block=0)
    with pytest.raises(TypeError, match="batch"):
        ModelHessian(model, [3])
    with pytest.raises(ValueError, match="unknown parameter"):
        ModelHessian(model, tokens, params=["nope"])
    with pytest.raises(ValueError, match="V must be"):
        op.matmat(torch.zeros(3, 1, dtype=torch.float64))
    sub = ModelHessian(model, tokens, params=["ln_f.weight", "ln_f.bias"])
    assert sub.shape == (2 * 4, 2 * 4)


# ----------------------------------------------------------------------------- estimators
def test_hutchinson_and_hutchpp_within_3_stderr(exact_h):
    exact = reference.spectral_trace_reference(exact_h, "identity")
    for seed in (0, 1):
        h = hutchinson_trace(exact_h, 60, seed=seed)
        hpp = hutchpp_trace(exact_h, 60, seed=seed)
        assert h.num_matvecs == 60 and hpp.num_matvecs == 60
        _within(h, exact)
        _within(hpp, exact)
        assert hpp.stderr < h.stderr  # outlier eigenvalues: the sketch removes variance


def test_hutchinson_on_model_operator(gpt_case):
    _, _, op, H = gpt_case
    exact = reference.spectral_trace_reference(H, "identity")
    est = hutchinson_trace(op, 24, seed=7)
    assert op.quadratic_path == "taylor"
    dense = hutchinson_trace(H, 24, seed=7)  # same probes -> same samples
    assert est.value == pytest.approx(dense.value, rel=1e-9)
    _within(est, exact)


@pytest.mark.parametrize("f", ["identity", "sqrt_abs", "sqrt_clamped"])
def test_slq_within_3_stderr(exact_h, f):
    exact = reference.spectral_trace_reference(exact_h, f)
    est = slq_trace(exact_h, f, num_probes=24, lanczos_steps=80, deflation_steps=100, seed=0)
    _within(est, exact)
    assert est.num_matvecs <= 24 * 80 + 100


def test_slq_sqrt_abs_within_one_percent(exact_h):
    exact = reference.spectral_trace_reference(exact_h, "sqrt_abs")
    # 75 of the 348 eigenvalues are ~0, where sqrt|.| is not smooth: enough Lanczos steps keep the
    # quadrature bias small, deflating the resolved part of the spectrum removes most variance.
    for seed in (3, 4):
        est = slq_trace(exact_h, "sqrt_abs", num_probes=24, lanczos_steps=80, deflation_steps=200, seed=seed)
        assert abs(est.value / exact - 1) < 0.01, (est, exact)
    plain = slq_trace(exact_h, "sqrt_abs", num_probes=48, lanczos_steps=80, seed=3)
    _within(plain, exact)


def test_slq_log_on_spd_matrix():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(200, 200, dtype=torch.float64, generator=g)
    H = A @ A.T / 200 + 0.5 * torch.eye(200, dtype=torch.float64)
    exact = reference.spectral_trace_reference(H, "log")
    est = slq_trace(H, "log", num_probes=20, lanczos_steps=40)
    _within(est, exact)
    custom = slq_trace(H, lambda t: t**2, num_probes=20, lanczos_steps=40)
    _within(custom, float((H @ H).trace()))


def test_slq_full_krylov_is_exact_quadrature():
    """With lanczos_steps >= n every probe's quadrature is exact: SLQ(identity) == Hutchinson."""
    H = torch.diag(torch.linspace(-1, 5, 30, dtype=torch.float64))
    a = slq_trace(H, "identity", num_probes=10, lanczos_steps=50)
    b = hutchinson_trace(H, 10)
    assert a.value == pytest.approx(b.value, rel=1e-10)
    full = slq_trace(H, "sqrt_abs", num_probes=2, lanczos_steps=10, deflation_steps=40)
    assert full.value == pytest.approx(reference.spectral_trace_reference(H, "sqrt_abs"), rel=1e-10)


def test_stderr_is_calibrated():
    """Across seeds, about 95% of Hutchinson estimates lie within 2 stderr (not a tautology)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(60, 60, dtype=torch.float64, generator=g)
    H = A + A.T
    exact = float(H.trace())
    hits = sum(abs((e := hutchinson_trace(H, 30, seed=s)).value - exact) <= 2 * e.stderr for s in range(40))
    assert 32 <= hits <= 40


def test_seeds_are_deterministic(exact_h):
    a = hutchinson_trace(exact_h, 10, seed=5)
    b = hutchinson_trace(exact_h, 10, seed=5, probe_block=3)
    assert (b.value, b.stderr) == (pytest.approx(a.value, rel=1e-12), pytest.approx(a.stderr, rel=1e-9))
    assert a.value != hutchinson_trace(exact_h, 10, seed=6).value


def test_spectral_density(exact_h, tmp_path):
    d = spectral_density(exact_h, num_probes=6, lanczos_steps=40, grid=2000)
    mass = float(d.value.sum() * (d.grid[1] - d.grid[0]))
    assert mass == pytest.approx(1.0, abs=2e-3)
    lam = torch.linalg.eigvalsh(exact_h)
    assert float(d.ritz_values[~d.ritz_values.isnan()].max()) == pytest.approx(float(lam.max()), rel=1e-6)
    assert d.value.shape == d.stderr.shape == d.grid.shape
    path = d.plot(str(tmp_path / "density.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(d.to_dict()) >= {"value", "stderr", "num_matvecs", "grid", "ritz_values"}


def test_estimator_validation():
    H = torch.eye(4)
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchinson_trace(H, 0)
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchpp_trace(H, 2)
    with pytest.raises(ValueError, match="f must be one of"):
        slq_trace(H, "cube", num_probes=2, lanczos_steps=2)
    with pytest.raises(TypeError, match="matmat"):
        hutchinson_trace(object(), 3)
    with pytest.raises(ValueError, match="square"):
        hutchinson_trace(torch.zeros(3, 4), 3)
    with pytest.raises(TypeError, match="num_probes"):
        slq_trace(H, num_probes=2.5, lanczos_steps=2)


# ----------------------------------------------------------------------------- proxy Hessian + QuIP
def test_proxy_hessian_operator():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 40, generator=g) * torch.linspace(0.1, 3, 40)
    op = ProxyHessian(X, chunk_rows=128)
    H = X.double().T @ X.double() / 500
    V = torch.randn(40, 3, generator=g)
    torch.testing.assert_close(op.matmat(V).double(), H @ V.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(op.dense(), H, rtol=1e-5, atol=1e-5)
    assert op.trace() == pytest.approx(float(H.trace()), rel=1e-10)
    fast = hutchinson_trace(op, 48, seed=2)  # in-kernel probes
    generic = hutchinson_trace(DenseOperator(H), 48, seed=2)  # materialised probes
    assert fast.value == pytest.approx(generic.value, rel=1e-5)
    _within(fast, float(H.trace()))


def test_collect_proxy_hessians_and_quip_table(gpt_case):
    model, tokens, _, _ = gpt_case
    hs = collect_proxy_hessians(model, [tokens[:4], tokens[4:]])
    assert "blocks.0.mlp.0" in hs and "lm_head" in hs
    xs = []
    h2 = model.blocks[0].mlp[0].register_forward_hook(lambda m, i, o: xs.append(i[0].detach().reshape(-1, 4)) and None)
    with torch.no_grad():
        model(tokens[:4, :-1])
        model(tokens[4:, :-1])
    h2.remove()
    X = torch.cat(xs).double()
    torch.testing.assert_close(hs["blocks.0.mlp.0"], X.T @ X / X.shape[0])

    rows = quip_link_table(model, {"blocks.0.mlp.0": hs["blocks.0.mlp.0"]}, bits=(2, 4))
    assert len(rows) == 2
    for r in rows:
        assert 0 < r["ldlq_gain"] <= 1 + 1e-12
        assert r["predicted_ldlq"] <= r["predicted_nearest"] + 1e-15
        assert r["measured_proxy_loss"] is None or r["measured_proxy_loss"] >= 0
    assert rows[1]["predicted_ldlq"] < rows[0]["predicted_ldlq"]  # more bits, smaller loss
    assert "gain" in format_table(rows)


def test_sqrt_trace_stats_isotropic_gain_is_one():
    stats = sqrt_trace_stats(3.0 * torch.eye(10, dtype=torch.float64))
    assert stats["ldlq_gain"] == pytest.approx(1.0)
    skew = sqrt_trace_stats(torch.diag(torch.tensor([100.0, 1e-4, 1e-4, 1e-4], dtype=torch.float64)))
    assert skew["ldlq_gain"] < 0.3


# ----------------------------------------------------------------------------- Taylor mode
def _directions(sizes_shapes, V):
    """[n, k] -> [k, *shape] per parameter (the layout TaylorTape.push takes)."""
    k = V.shape[1]
    return [c.reshape(k, *s) for c, s in zip(torch.split(V.T, [math.prod(s) for s in sizes_shapes], dim=1),
                                           sizes_shapes, strict=True)]


def _zoo_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 5), (5, 3), (3,), (5,), (2, 3, 4), (4,)]
    return [torch.randn(s, dtype=torch.float64, generator=g) * 0.7 for s in shapes]


_ZX = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))


def _zoo(ps):
    """A scalar touching every op with a Taylor rule (and both argument orders of the bilinear ones)."""
    F = torch.nn.functional
    A, B, c, g, T, b = ps
    X = _ZX
    h = torch.tanh(X @ A)
    h = F.layer_norm(h, (5,), g, None) + F.layer_norm(h * g, (5,))
    h = torch.addmm(c, h, B, beta=0.5, alpha=2.0)  # [4, 3]
    s = torch.softmax(h, -1) + torch.log_softmax(1.5 * h, dim=0)
    u = torch.sigmoid(h) * torch.erf(h) / (1.5 + h ** 2) + 1 / (2 + torch.exp(-h))
    v = torch.rsqrt(1 + h * h) + torch.sqrt(2 + torch.sin(h)) + torch.cos(h) * F.silu(h)
    v = v + F.gelu(h, approximate="tanh") * F.gelu(h) + torch.relu(h + 0.3) * h + torch.log(3 + torch.cos(h))
    w = torch.where(X[:, :3] > 0, u, v).masked_fill(X[:, 2:] > 1.0, 0.0) + s
    m = torch.amax(w, dim=1, keepdim=True) - w.mean(0).mean()
    parts = torch.split(w, [1, 2], dim=1)
    cat = torch.cat([parts[1], parts[0] * 2, m], dim=1)  # [4, 4]
    st = torch.stack(torch.unbind(cat, 0), dim=1).transpose(0, 1).permute(1, 0)  # [4, 4]
    t3 = torch.bmm(T, st[:, :, None].expand(4, 4, 2)[:2] * 1.0)  # [2, 3, 2]
    idx = torch.tensor([2, 0, 1])
    picked = t3[:, idx].index_select(2, torch.tensor([1])).squeeze(-1) + t3.gather(1, torch.tensor([[[0], [2], [1]]] * 2))[..., 0]
    lin = F.linear(cat, torch.outer(b, b[:3].sum() * torch.ones(4, dtype=torch.float64)), b)  # dependent weight and bias
    tgt = torch.tensor([1, -100, 3, 0])
    nll = F.cross_entropy(lin, tgt, ignore_index=-100) + F.nll_loss(F.log_softmax(lin, -1), tgt.clamp_min(0), reduction="sum")
    broadcast = (c + X[:, :3]).sum() ** 2  # a [3] tangent broadcast to [4, 3] before a reduction
    return nll + picked.sum() + (cat[1:3, ::2] ** 3).sum() / cat.abs().add(1).sum().detach() + st.select(0, 1).sum() ** 2 \
        + broadcast


def test_taylor_tape_op_zoo_matches_exact_hessian():
    from tokenbounds.hessian.taylor import TaylorTape

    ps = _zoo_params()
    shapes = [p.shape for p in ps]
    flat0 = torch.cat([p.reshape(-1) for p in ps])

    def f(flat):
        return _zoo([c.view(s) for c, s in zip(torch.split(flat, [math.prod(s) for s in shapes]), shapes, strict=True)])

    H = reference.exact_hessian_reference(f, flat0)
    grad = torch.func.grad(f)(flat0)
    V = torch.randn(flat0.numel(), 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tape = TaylorTape(_zoo, ps)
    d1, d2 = tape.push(_directions(shapes, V))
    torch.testing.assert_close(d1.reshape(-1), grad @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d2, ((H @ V) * V).sum(0), rtol=1e-10, atol=1e-10)
    assert float(tape.out) == pytest.approx(float(f(flat0)), rel=1e-14)
    # Directions one at a time give the same numbers (block of k == k blocks of one).
    singles = torch.cat([tape.push(_directions(shapes, V[:, c:c + 1]))[1] for c in range(V.shape[1])])
    torch.testing.assert_close(singles, d2, rtol=1e-12, atol=1e-12)


def test_taylor_negative_control_broken_rule_is_detected(gpt_case, monkeypatch):
    """Dropping GELU's second derivative must break the oracle comparison (the test can fail)."""
    from tokenbounds.hessian import taylor

    model, tokens, _, H = gpt_case
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    exact = ((H @ V) * V).sum(0)
    monkeypatch.setitem(taylor._RULES, torch.ops.aten.gelu.default,
                        taylor._unary(lambda x, y, approximate="none": (taylor._gelu_derivs(x, y)[0], 0 * x)))
    broken = ModelHessian(model, tokens, quadratic="taylor").quadratic_forms(V)
    assert not torch.allclose(broken, exact, rtol=1e-4, atol=1e-6)


def test_taylor_quadratic_forms_match_exact(gpt_case):
    model, tokens, op, H = gpt_case
    V = torch.randn(H.shape[0], 7, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    exact = ((H @ V) * V).sum(0)
    taylor = ModelHessian(model, tokens, probe_block=3)  # 3 + 3 + 1: blocks and the cached tape
    torch.testing.assert_close(taylor.quadratic_forms(V), exact, rtol=1e-10, atol=1e-10)
    assert taylor.quadratic_path == "taylor"
    hvp = ModelHessian(model, tokens, quadratic="hvp")
    torch.testing.assert_close(hvp.quadratic_forms(V), exact, rtol=1e-10, atol=1e-10)
    assert hvp.quadratic_path == "hvp"
    two = ModelHessian(model, [tokens[:4], tokens[4:]])
    ref = 0.5 * (ModelHessian(model, tokens[:4], quadratic="hvp").quadratic_forms(V)
                 + ModelHessian(model, tokens[4:], quadratic="hvp").quadratic_forms(V))
    torch.testing.assert_close(two.quadratic_forms(V), ref, rtol=1e-10, atol=1e-10)


def test_hutchinson_uses_quadratic_forms_not_matvecs(gpt_case, monkeypatch):
    model, tokens, _, H = gpt_case
    op = ModelHessian(model, tokens)
    monkeypatch.setattr(op, "matmat", lambda V: pytest.fail("Hutchinson formed H z"))
    est = hutchinson_trace(op, 10, seed=3)
    assert est.value == pytest.approx(hutchinson_trace(H, 10, seed=3).value, rel=1e-9)


class _WithCumsum(nn.Module):
    """A model whose forward reaches ops without a Taylor rule (cumsum) or mutates in place."""

    def __init__(self, inner: nn.Module, inplace: bool):
        super().__init__()
        self.inner, self.inplace = inner, inplace

    def forward(self, x):
        logits = self.inner(x)
        if self.inplace:
            logits = logits.clone()
            logits.mul_(1.5)
            return logits
        return torch.cumsum(logits, dim=-1) * 0.1 + logits


@pytest.mark.parametrize("inplace", [False, True])
def test_taylor_falls_back_to_hvp_when_an_op_has_no_rule(gpt_case, inplace):
    model, tokens, _, _ = gpt_case
    wrapped = _WithCumsum(model, inplace)
    V = torch.randn(sum(p.numel() for p in wrapped.parameters()), 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(8))
    auto = ModelHessian(wrapped, tokens)
    got = auto.quadratic_forms(V)
    assert auto.quadratic_path == "hvp"
    assert ("cumsum" if not inplace else "in-place") in auto.taylor_unsupported
    ref = (ModelHessian(wrapped, tokens, quadratic="hvp").matmat(V) * V).sum(0)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="quadratic='hvp'"):
        ModelHessian(wrapped, tokens, quadratic="taylor").quadratic_forms(V)


def test_batched_probes_match_one_probe_at_a_time(gpt_case):
    """is_grads_batched / vmap blocks vs one backward per probe, float64 (autograd, func, GGN)."""
    model, tokens, _, H = gpt_case
    V = torch.randn(H.shape[0], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    one = ModelHessian(model, tokens, probe_block=1).matmat(V)
    batched = ModelHessian(model, tokens, probe_block=5)
    torch.testing.assert_close(batched.matmat(V), one, rtol=1e-10, atol=1e-12)
    assert batched._batched_ok  # the block really went through one batched backward
    func = ModelHessian(model, tokens, method="func", probe_block=5).matmat(V)
    torch.testing.assert_close(func, one, rtol=1e-10, atol=1e-12)
    small = tokens[:2]
    g_one = GaussNewton(model, small, probe_block=1).matmat(V)
    g_batched = GaussNewton(model, small, probe_block=5)
    torch.testing.assert_close(g_batched.matmat(V), g_one, rtol=1e-10, atol=1e-12)
    assert g_batched._batched_ok


def test_automatic_path_choice(gpt_case, monkeypatch):
    from tokenbounds.hessian import operators

    model, tokens, _, _ = gpt_case
    op = ModelHessian(model, tokens)
    assert op.probe_block == operators.MAX_PROBE_BLOCK  # a small model: one pass for 16 probes
    monkeypatch.setattr(operators, "PROBE_BLOCK_BYTES", 4 * op.shape[0] * 8 * 3)  # room for 3 float64 probes
    assert ModelHessian(model, tokens).probe_block == 3
    monkeypatch.setattr(operators, "PROBE_BLOCK_BYTES", 1)
    assert GaussNewton(model, tokens).probe_block == 1
    assert op.method == "auto"  # per block, the faster HVP path in benchmarks/bench_hessian.py
    assert op.method_for(operators.FUNC_MIN_BLOCK) == "func" and op.method_for(operators.FUNC_MIN_BLOCK - 1) == "autograd"
    assert ModelHessian(model, tokens, method="autograd").method_for(16) == "autograd"
    V = torch.randn(op.shape[0], operators.FUNC_MIN_BLOCK, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    big = ModelHessian(model, tokens, probe_block=operators.FUNC_MIN_BLOCK)  # one func block
    torch.testing.assert_close(big.matmat(V), ModelHessian(model, tokens, method="autograd").matmat(V),
                               rtol=1e-10, atol=1e-12)
    assert big._func_ok
    assert op.quadratic == "auto" and op.quadratic_path == "taylor"
    assert ModelHessian(model, tokens, method="func").method == "func"
    with pytest.raises(ValueError, match="quadratic"):
        ModelHessian(model, tokens, quadratic="bogus")
    assert GaussNewton(model, tokens).quadratic_path == "taylor"


@pytest.mark.slow  # importing transformers alone takes ~15 s here
@pytest.mark.parametrize("family", ["gpt2", "llama", "gptneox"])
def test_taylor_covers_hugging_face_models(tmp_path, family):
    """Every op of the tiny HF causal LMs has a rule; Taylor forms equal z . H z (float64)."""
    pytest.importorskip("transformers")
    from _tiny_models import tiny_hf

    model = tiny_hf(family, str(tmp_path), vocab=40).double().eval()
    tokens = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    op = ModelHessian(model, tokens)
    got = op.quadratic_forms(V)
    assert op.quadratic_path == "taylor", op.taylor_unsupported
    ref = ModelHessian(model, tokens, quadratic="hvp").quadratic_forms(V)
    # Llama's RMSNorm computes in float32 even in a float64 model, in both paths.
    tol = 1e-5 if family == "llama" else 1e-10
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref.abs().max()))
    ggn = GaussNewton(model, tokens)
    torch.testing.assert_close(ggn.quadratic_forms(V), (ggn.matmat(V) * V).sum(0), rtol=tol, atol=0.0)
    assert ggn.quadratic_path == "taylor"


def test_taylor_tape_validates_directions():
    from tokenbounds.hessian import TaylorTape

    ps = _zoo_params()
    tape = TaylorTape(_zoo, ps)
    good = [torch.zeros(2, *p.shape, dtype=torch.float64) for p in ps]
    with pytest.raises(ValueError, match="direction tensors"):
        tape.push(good[:-1])
    with pytest.raises(ValueError, match=r"directions\[1\] must be"):
        tape.push([good[0], torch.zeros(2, 3, 5, dtype=torch.float64), *good[2:]])
    with pytest.raises(ValueError, match="scalar"):
        TaylorTape(lambda q: q[0] * 2, ps)
    d1, d2 = tape.push(good)
    assert d1.shape == (2,) and torch.equal(d2, torch.zeros(2, dtype=torch.float64))
