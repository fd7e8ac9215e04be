"""Hadamard matrices and tokenbounds.hadamard_transform on every backend against dense oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tokenbounds
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenbounds.ops._dispatch import available_backends
from tokenbounds.ops.hadamard import hadamard_signs, hadamard_transform
from tokenbounds.quant.hadamard_matrices import (
    SUPPORTED_BASES,
    base_hadamard,
    hadamard_factor,
    hadamard_matrix,
    next_supported_size,
    random_signs,
)

BACKENDS = [b for b in available_backends("hadamard_transform", "cpu")]
TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _params(backends):
    return [pytest.param(b, marks=pytest.mark.triton) if b == "triton" else b for b in backends]


def _dense(x: torch.Tensor, scale: float) -> torch.Tensor:
    h = torch.from_numpy(hadamard_matrix(x.shape[-1]).astype(np.float64))
    return scale * x.double() @ h.T


def _close(y: torch.Tensor, want: torch.Tensor, dtype) -> None:
    err = (y.double() - want).abs()
    # relative to the row's rms: fp32/fp64 accumulate rounding over log2(n) stages
    bound = TOL[dtype] * (want.abs() + want.pow(2).mean(-1, keepdim=True).sqrt())
    assert bool((err <= bound).all()), float((err / bound.clamp_min(1e-30)).max())


@pytest.mark.parametrize("k", SUPPORTED_BASES)
def test_base_matrices_are_hadamard(k):
    h = base_hadamard(k).astype(np.int64)
    assert set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, k * np.eye(k, dtype=np.int64))


@pytest.mark.parametrize("n", [1, 2, 8, 40, 80, 96, 160, 208, 224, 288, 480, 864, 1120])
def test_dense_matrices_are_hadamard(n):
    h = hadamard_matrix(n).astype(np.float64)  # float64 products of +-1 are exact here
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


def test_factorization_and_padding():
    assert hadamard_factor(4096) == (1, 4096)
    assert hadamard_factor(40 * 64) == (20, 128)
    assert hadamard_factor(5120) == (20, 256)
    assert hadamard_factor(108 * 8) == (108, 8)
    assert hadamard_factor(6) is None and hadamard_factor(44) is None and hadamard_factor(0) is None
    assert next_supported_size(768) == 768  # 12 * 64 (GPT-2 width)
    assert next_supported_size(3072) == 3072
    assert next_supported_size(50257) > 50257 and hadamard_factor(next_supported_size(50257))


@pytest.mark.parametrize("backend", _params(BACKENDS))
@pytest.mark.parametrize("k", SUPPORTED_BASES)
@pytest.mark.parametrize("m", [1, 8])
def test_transform_matches_dense_every_base(backend, k, m):
    n = k * m
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=gen)
    y = hadamard_transform(x, backend=backend)
    _close(y, _dense(x, 1 / math.sqrt(n)), torch.float32)


@pytest.mark.parametrize("backend", _params(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [4, 256, 12 * 32, 20 * 8])
def test_transform_dtypes(backend, dtype, n):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = hadamard_transform(x, scale=0.5, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    _close(y, _dense(x, 0.5), dtype)


@given(
    k=st.sampled_from(SUPPORTED_BASES),
    log_m=st.integers(0, 5),
    rows=st.integers(1, 9),
    seed=st.one_of(st.none(), st.integers(0, 2**40)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_property_cpu_matches_reference_and_inverts(k, log_m, rows, seed, dtype):
    n = k * 2**log_m
    x = (torch.randn(rows, n, generator=torch.Generator().manual_seed(rows + n)) * 3).to(dtype)
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    y = hadamard_transform(x, seed=seed, backend=backend)
    signs = torch.ones(n, dtype=torch.float64) if seed is None else hadamard_signs(n, seed, dtype=torch.float64)
    _close(y, _dense(x.double() * signs, 1 / math.sqrt(n)), dtype)
    if dtype == torch.float32:
        back = hadamard_transform(y, seed=seed, inverse=True, backend=backend)
        assert torch.allclose(back, x, atol=1e-5 * float(x.abs().max()) + 1e-6)


@pytest.mark.parametrize("backend", _params(BACKENDS))
def test_randomized_inverse_is_exact_float64(backend):
    n = 12 * 16
    x = torch.randn(2, 2, n, dtype=torch.float64)
    for scale in (None, 0.25):
        y = hadamard_transform(x, seed=123, scale=scale, backend=backend)
        assert y.shape == x.shape
        back = hadamard_transform(y, seed=123, scale=scale, inverse=True, backend=backend)
        torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
        # orthogonal at the default scale: the norm is preserved
        if scale is None:
            torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    # a different seed is a different transform
    assert not torch.allclose(hadamard_transform(x, seed=124), hadamard_transform(x, seed=123))


def test_signs_are_seeded_and_pinned():
    s = random_signs(4096, 7)
    np.testing.assert_array_equal(s, random_signs(4096, 7))
    assert abs(int(s.sum())) < 300  # balanced
    assert (s != random_signs(4096, 8)).mean() > 0.4
    assert (s != random_signs(4096, 7, stream=1)).mean() > 0.4
    # pinned values: the stored seed must describe the same transform in every future version
    assert random_signs(16, 0).tolist() == [1, 1, -1, -1, 1, -1, 1, -1, 1, 1, 1, -1, 1, 1, -1, 1]


def test_scalar_fallback_matches_simd(monkeypatch):
    if "cpu" not in BACKENDS:
        pytest.skip("extension not built")
    x = torch.randn(7, 20 * 64)
    y = hadamard_transform(x, backend="cpu")
    monkeypatch.setenv("TOKENBOUNDS_CPU_ISA", "scalar")
    y_scalar = hadamard_transform(x, backend="cpu")
    torch.testing.assert_close(y_scalar, y, rtol=0, atol=2e-6)


def test_noncontiguous_leading_dims_and_empty():
    x = torch.randn(64, 6, 3).transpose(0, 2)  # [3, 6, 64] non-contiguous
    y = hadamard_transform(x)
    _close(y.reshape(-1, 64), _dense(x.reshape(-1, 64), 1 / 8), torch.float32)
    assert hadamard_transform(torch.empty(0, 8)).shape == (0, 8)
    assert tokenbounds.hadamard_transform is hadamard_transform


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(x=[1.0, 2.0]), TypeError, "torch.Tensor"),
        (dict(x=torch.ones(4, dtype=torch.int64)), TypeError, "float32"),
        (dict(x=torch.ones(6)), ValueError, "pad the last dimension to 8"),
        (dict(x=torch.ones(44)), ValueError, "no Hadamard construction for K = 44"),
        (dict(x=torch.ones(0)), ValueError, "empty last dimension"),
        (dict(x=torch.tensor(1.0)), ValueError, "at least one dimension"),
        (dict(x=torch.ones(4), scale=0.0), ValueError, "scale"),
        (dict(x=torch.ones(4), scale=float("nan")), ValueError, "scale"),
        (dict(x=torch.ones(4), scale="1"), TypeError, "scale"),
        (dict(x=torch.ones(4), seed=-1), ValueError, "seed"),
        (dict(x=torch.ones(4), seed=1.5), ValueError, "seed"),
        (dict(x=torch.ones(4), backend="gpu"), ValueError, "backend"),
        (dict(x=torch.ones(4), backend="cuda"), ValueError, "CUDA"),
    ],
)
def test_validation(kwargs, exc, match):
    x = kwargs.pop("x")
    with pytest.raises(exc, match=match):
        hadamard_transform(x, **kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n",
    # Rows above 49152 leave the CUDA kernel for Triton's one-tile kernel, which took minutes to
    # compile/run at 65536 on an H100: kept, but out of the fast suite until that path is tiled.
    [64, 12 * 128, 4096, 20 * 2048, pytest.param(65536, marks=pytest.mark.slow)],
)
def test_cuda_matches_dense(dtype, n):
    x = torch.randn(5, n, device="cuda").to(dtype)
    for backend in available_backends("hadamard_transform", "cuda"):
        if backend == "reference" and n > 8192:
            continue
        y = hadamard_transform(x, backend=backend).cpu()
        _close(y, _dense(x.cpu(), 1 / math.sqrt(n)), dtype)
