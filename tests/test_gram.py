"""gram family kernels (X^T X upper triangle, in-kernel Rademacher probes) on every backend vs reference."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenbounds import reference
from tokenbounds.ops import gram as G
from tokenbounds.ops._dispatch import available_backends

BACKENDS = [b for b in available_backends("gram_accumulate_", "cpu")]
# "cpu-tile": the C++ kernel's SIMD tile path (TOKENBOUNDS_GRAM_PATH=tile) instead of its BLAS path.
GRAM_BACKENDS = BACKENDS + (["cpu-tile"] if "cpu" in BACKENDS else [])


def _backend_param(b):
    return pytest.param(b, marks=pytest.mark.triton) if b == "triton" else b


@contextlib.contextmanager
def _gram_path(backend: str):
    """Yield the dispatch backend name, with TOKENBOUNDS_GRAM_PATH set for the "cpu-tile" case."""
    if backend != "cpu-tile":
        yield backend
        return
    old = os.environ.get("TOKENBOUNDS_GRAM_PATH")
    os.environ["TOKENBOUNDS_GRAM_PATH"] = "tile"
    try:
        yield "cpu"
    finally:
        if old is None:
            del os.environ["TOKENBOUNDS_GRAM_PATH"]
        else:
            os.environ["TOKENBOUNDS_GRAM_PATH"] = old


@pytest.mark.parametrize("backend", [_backend_param(b) for b in GRAM_BACKENDS])
@given(
    n=st.integers(1, 70),
    d=st.integers(1, 53),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    acc_dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31),
)
def test_gram_accumulate_matches_reference(backend, n, d, dtype, acc_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) * 3).to(dtype)
    acc = torch.randn(d, d, generator=g, dtype=acc_dtype)
    before = acc.clone()
    with _gram_path(backend) as b:
        G.gram_accumulate_(acc, x, backend=b)
    ref = reference.gram_accumulate_reference(before, x)
    scale = float((x.double() ** 2).sum(0).max()) + 1.0
    tol = (2e-5 if acc_dtype == torch.float32 else 1e-10) * scale
    assert float((torch.triu(acc).double() - torch.triu(ref)).abs().max()) <= tol
    assert torch.equal(torch.tril(acc, -1), torch.tril(before, -1))  # lower triangle untouched


@pytest.mark.parametrize("path", ["cpu", "cpu-tile"])
@pytest.mark.parametrize("dtype,acc_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float64), (torch.float64, torch.float64)])
def test_gram_accumulate_wide(path, dtype, acc_dtype):
    """d = 700 > 2 x 256: the BLAS path's upper tiles, partial edge tiles, strided rows."""
    if "cpu" not in BACKENDS:
        pytest.skip("extension not built")
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(90, 760, generator=g) * 2).to(dtype)[:, 30:730]  # row stride 760 != d
    acc = torch.randn(700, 700, generator=g, dtype=acc_dtype)
    before = acc.clone()
    with _gram_path(path) as b:
        G.gram_accumulate_(acc, x, backend=b)
    ref = reference.gram_accumulate_reference(before, x)
    scale = float((x.double() ** 2).sum(0).max()) + 1.0
    tol = (2e-5 if acc_dtype == torch.float32 else 1e-10) * scale
    assert float((torch.triu(acc).double() - torch.triu(ref)).abs().max()) <= tol
    assert torch.equal(torch.tril(acc, -1), torch.tril(before, -1))


@pytest.mark.parametrize("backend", [_backend_param(b) for b in BACKENDS])
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 45),
    k=st.integers(1, 37),
    offset=st.integers(0, 2**32 - 100),
    seed=st.integers(0, 2**63 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_rademacher_matmul_matches_reference(backend, n, d, k, offset, seed, dtype):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed % 2**31)).to(dtype)
    y = G.rademacher_matmul(x, k, seed=seed, offset=offset, backend=backend)
    ref = reference.rademacher_matmul_reference(x, k, seed, offset)
    assert y.dtype == ref.dtype and y.shape == (n, k)
    atol = 0 if dtype == torch.float64 and backend == "reference" else 1e-4 * (d**0.5 + 1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("backend", ["cpu", "reference", None])
def test_probes_bit_identical_across_backends(backend):
    if backend == "cpu" and "cpu" not in BACKENDS:
        pytest.skip("extension not built")
    for seed, offset in [(0, 0), (12345, 7), (2**63 - 1, 2**32 - 20)]:
        ref = reference.rademacher_probes_reference(101, 20, seed, offset)
        z = G.rademacher_probes(101, 20, seed=seed, offset=offset, dtype=torch.float64, backend=backend)
        assert torch.equal(z, ref)
    # the torch fallback used on devices without a kernel
    assert torch.equal(G._probes_torch(101, 20, 99, 3, torch.float64, "cpu"),
                       reference.rademacher_probes_reference(101, 20, 99, 3))


def test_probe_columns_are_a_stream():
    full = G.rademacher_probes(64, 32, seed=9)
    assert torch.equal(G.rademacher_probes(64, 8, seed=9, offset=8), full[:, 8:16])
    assert not torch.equal(G.rademacher_probes(64, 32, seed=10), full)


def test_probes_look_random():
    z = G.rademacher_probes(4096, 64, seed=1, dtype=torch.float64)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(z.mean())) < 0.01  # 262144 signs: 5 sigma ~ 0.01
    corr = (z.T @ z) / 4096 - torch.eye(64, dtype=torch.float64)
    assert float(corr.abs().max()) < 5 / 64  # columns independent: |corr| ~ 1/64
    rows = (z[:-1] * z[1:]).mean()  # neighbouring rows independent
    assert abs(float(rows)) < 0.01


def test_gram_symmetric_and_scalar_isa(monkeypatch):
    x = torch.randn(300, 70)
    full = G.gram(x, acc_dtype=torch.float64)
    torch.testing.assert_close(full, x.double().T @ x.double())
    if "cpu" in BACKENDS:
        monkeypatch.setenv("TOKENBOUNDS_CPU_ISA", "scalar")
        torch.testing.assert_close(G.gram(x, backend="cpu"), x.T @ x, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(G.rademacher_matmul(x, 20, seed=3, backend="cpu"),
                                   reference.rademacher_matmul_reference(x, 20, 3, 0), rtol=1e-5, atol=1e-4)


def test_non_contiguous_and_empty_inputs():
    x = torch.randn(20, 60)[:, ::2]
    torch.testing.assert_close(G.gram(x), x.T @ x, rtol=1e-5, atol=1e-4)
    acc = torch.ones(5, 5)
    G.gram_accumulate_(acc, torch.zeros(0, 5))
    assert torch.equal(acc, torch.ones(5, 5))
    assert G.rademacher_matmul(torch.zeros(0, 5), 3).shape == (0, 3)
    assert G.rademacher_matmul(torch.randn(4, 5), 0).shape == (4, 0)


def test_validation_errors():
    x = torch.randn(10, 4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        G.gram_accumulate_(torch.zeros(4, 4), [[1.0]])
    with pytest.raises(TypeError, match="float32, bfloat16"):
        G.gram_accumulate_(torch.zeros(4, 4), x.to(torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        G.gram_accumulate_(torch.zeros(4, 4), x[None])
    with pytest.raises(ValueError, match=r"must be \(d, d\)"):
        G.gram_accumulate_(torch.zeros(3, 3), x)
    with pytest.raises(TypeError, match="acc must be float32 or float64"):
        G.gram_accumulate_(torch.zeros(4, 4, dtype=torch.float16), x)
    with pytest.raises(ValueError, match="requires? grad"):
        G.gram_accumulate_(torch.zeros(4, 4, requires_grad=True), x)
    with pytest.raises(ValueError, match="unit column stride"):
        G.gram_accumulate_(torch.zeros(4, 4).T.contiguous().T[:, :].t().t()[::1].as_strided((4, 4), (1, 4)), x)
    with pytest.raises(ValueError, match="k must be >= 0"):
        G.rademacher_matmul(x, -1)
    with pytest.raises(ValueError, match="seed"):
        G.rademacher_matmul(x, 2, seed=-3)
    with pytest.raises(TypeError, match="seed must be an int"):
        G.rademacher_matmul(x, 2, seed=1.5)
    with pytest.raises(ValueError, match="2\\^32"):
        G.rademacher_matmul(x, 10, offset=2**32 - 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        G.gram(x, backend="gpu")
    with pytest.raises(TypeError, match="acc_dtype"):
        G.gram(x, acc_dtype=torch.float16)


@pytest.mark.cuda
def test_cuda_backends_match_reference():
    x = torch.randn(300, 77, device="cuda", dtype=torch.bfloat16)
    for backend in available_backends("gram_accumulate_", "cuda"):
        acc = torch.zeros(77, 77, device="cuda", dtype=torch.float64)
        G.gram_accumulate_(acc, x, backend=backend)
        ref = reference.gram_accumulate_reference(torch.zeros(77, 77), x.cpu())
        torch.testing.assert_close(torch.triu(acc).cpu(), torch.triu(ref), rtol=1e-9, atol=1e-8)
        y = G.rademacher_matmul(x, 19, seed=5, offset=3, backend=backend)
        torch.testing.assert_close(y.cpu(), reference.rademacher_matmul_reference(x.cpu(), 19, 5, 3), rtol=1e-4, atol=1e-3)
    z = G.rademacher_probes(77, 19, seed=5, offset=3, dtype=torch.float64, device="cuda")
    assert torch.equal(z.cpu(), reference.rademacher_probes_reference(77, 19, 5, 3))
