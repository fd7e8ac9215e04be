"""Williamson-type Hadamard orders 156 = 4 * 39 and 172 = 4 * 43, end to end on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenbounds.ops._dispatch import available_backends
from tokenbounds.ops.hadamard import hadamard_transform
from tokenbounds.quant.hadamard_matrices import (
    SUPPORTED_BASES,
    base_hadamard,
    circulant,
    hadamard_factor,
    hadamard_matrix,
    is_supported_size,
    next_supported_size,
    periodic_autocorrelation,
    williamson_first_rows,
)

WILLIAMSON = {156: 39, 172: 43}
ISSUE_BASES = (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)
BACKENDS = available_backends("hadamard_transform", "cpu")


@pytest.mark.parametrize("n", sorted(WILLIAMSON.values()))
def test_williamson_components(n):
    rows = williamson_first_rows(n)
    assert rows.shape == (4, n) and set(np.unique(rows)) == {-1, 1}
    # symmetric circulants: a_i = a_(n-i)
    np.testing.assert_array_equal(rows[:, 1:], rows[:, 1:][:, ::-1])
    paf = sum(periodic_autocorrelation(r) for r in rows)
    np.testing.assert_array_equal(paf, np.r_[4 * n, np.zeros(n - 1, dtype=np.int64)])
    mats = [circulant(r) for r in rows]
    for m in mats:
        np.testing.assert_array_equal(m, m.T)
    np.testing.assert_array_equal(sum(m @ m for m in mats), 4 * n * np.eye(n, dtype=np.int64))
    # row sums: (sum of a_i)^2 over the four sequences is 4n as well
    assert int((rows.sum(1) ** 2).sum()) == 4 * n


@pytest.mark.parametrize("k", sorted(WILLIAMSON))
def test_williamson_base_is_hadamard(k):
    h = base_hadamard(k).astype(np.int64)
    assert h.shape == (k, k) and set(np.unique(h)) == {-1, 1}
    np.testing.assert_array_equal(h @ h.T, k * np.eye(k, dtype=np.int64))
    np.testing.assert_array_equal(h.T @ h, k * np.eye(k, dtype=np.int64))


def test_every_issue_order_is_supported():
    assert set(WILLIAMSON) <= set(SUPPORTED_BASES)
    for k in ISSUE_BASES:
        for m in (1, 2, 64):
            assert is_supported_size(k * m), k * m
            assert next_supported_size(k * m) == k * m
    assert hadamard_factor(11008) == (172, 64)  # Llama-7B MLP width
    assert hadamard_factor(156 * 32) == (156, 32)


@pytest.mark.parametrize("n", [156 * 2, 172 * 4])
def test_dense_williamson_kronecker_is_hadamard(n):
    h = hadamard_matrix(n).astype(np.float64)  # exact: integer products well below 2^53
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


def _dense(x: torch.Tensor, scale: float) -> torch.Tensor:
    h = torch.from_numpy(hadamard_matrix(x.shape[-1]).astype(np.float64))
    return scale * x.double() @ h.T


def _cases():
    out = []
    for backend in BACKENDS:
        # the Triton interpreter takes ~2 s per K x K mix on CPU: two cases cover both orders
        combos = ([(172 * 8, torch.float32), (156, torch.float64)] if backend == "triton" else
                  [(n, d) for n in (156, 172, 156 * 16, 172 * 8) for d in (torch.float32, torch.float64)])
        marks = [pytest.mark.triton] if backend == "triton" else []
        out += [pytest.param(backend, n, d, marks=marks, id=f"{backend}-{n}-{str(d)[6:]}") for n, d in combos]
    return out


@pytest.mark.parametrize("backend, n, dtype", _cases())
def test_transform_matches_dense(backend, n, dtype):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n), dtype=dtype)
    y = hadamard_transform(x, backend=backend)
    want = _dense(x, 1 / math.sqrt(n))
    tol = 3e-6 if dtype == torch.float32 else 1e-12
    err = float((y.double() - want).abs().max())
    assert err <= tol * float(want.abs().max()), err
    z = hadamard_transform(y, seed=None, inverse=True, backend=backend)
    assert float((z.double() - x.double()).abs().max()) <= 10 * tol * float(x.abs().max())


def test_llama_width_randomized_round_trip():
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    x = torch.randn(2, 11008, generator=torch.Generator().manual_seed(0))
    y = hadamard_transform(x, seed=7, backend=backend)
    assert float(y.norm() / x.norm()) == pytest.approx(1.0, abs=1e-5)
    back = hadamard_transform(y, seed=7, inverse=True, backend=backend)
    torch.testing.assert_close(back, x, atol=2e-5, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [156 * 8, 11008, 172 * 256])
def test_cuda_williamson_orders(dtype, n):
    x = torch.randn(4, n, device="cuda").to(dtype)
    want = _dense(x.cpu().double(), 1 / math.sqrt(n))
    for backend in available_backends("hadamard_transform", "cuda"):
        if backend == "reference" and n > 8192:
            continue
        y = hadamard_transform(x, backend=backend).cpu().double()
        tol = 2e-6 if dtype == torch.float32 else 1.6e-2
        rms = want.pow(2).mean(-1, keepdim=True).sqrt()
        assert bool(((y - want).abs() <= tol * (want.abs() + rms)).all()), backend
