"""Kronecker-factored linear layer: a drop-in for ``nn.Linear`` with far fewer parameters.

The weight is a sum of ``rank`` Kronecker products (Lotfi, Kuang et al. 2024, arXiv 2407.18158,
section 4 use Kronecker factorizations as a compressible parametrization of a transformer's
linear layers; Van Loan & Pitsianis 1993 for the nearest-Kronecker projection)::

    W = sum_{r=1}^{R} A_r (x) B_r,   A_r: [o1, i1],  B_r: [o2, i2],  out = o1 o2,  in = i1 i2,

so ``W[(a, b), (c, d)] = sum_r A_r[a, c] B_r[b, d]`` (row-major index pairs) and the layer has
``R (o1 i1 + o2 i2)`` weights instead of ``out * in``. The matmul never forms W: with the input
row viewed as a matrix X [i1, i2], ``W vec(X) = vec(sum_r A_r X B_r^T)`` -- one GEMM for all
``X B_r^T`` and one batched matmul (with the bias fused) for the sum over r.

Storage (both 2-D, so that :func:`tokenbounds.quant.quantize_weight` codes them directly):
``outer = [A_1 ... A_R]`` of shape [o1, R i1] and ``inner = [B_1; ...; B_R]`` of shape
[R o2, i2]. Each row of ``inner`` acts on the rows of X and each row of ``outer`` on the stacked
columns of ``X B_r^T``, so a per-row code of either is a code of a genuine linear map.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["KroneckerLinear", "factor_pair", "factor_pairs"]


def factor_pairs(n: int) -> list[tuple[int, int]]:
    """Every ordered factorization ``n = a * b`` with ``a <= b`` (``(1, n)`` first)."""
    return [(a, n // a) for a in range(1, math.isqrt(n) + 1) if n % a == 0]


def factor_pair(n: int, what: str = "n") -> tuple[int, int]:
    """The factorization ``n = a * b`` (a <= b) with a closest to sqrt(n).

    Raises ValueError when only the trivial ``(1, n)`` exists (n prime): a Kronecker factor of
    size 1 makes the layer a plain dense map of one factor, which is no compression.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what} must be a positive int, got {n!r}")
    a, b = factor_pairs(n)[-1]
    if a == 1 and n > 3:
        raise ValueError(
            f"{what}={n} has no nontrivial factorization (it is prime): a Kronecker factorization "
            f"of this layer would be dense; pass the factors (1, {n}) explicitly to accept that, "
            "or exclude the layer"
        )
    return a, b


def _check_factors(n: int, factors, what: str) -> tuple[int, int]:
    if factors is None:
        return factor_pair(n, what)
    try:
        a, b = (int(f) for f in factors)
    except (TypeError, ValueError):
        raise ValueError(f"{what} factors must be a pair of ints, got {factors!r}") from None
    if a < 1 or b < 1 or a * b != n:
        options = ", ".join(f"{p} x {q}" for p, q in factor_pairs(n))
        raise ValueError(
            f"{what} factors {a} x {b} = {a * b} do not factor the layer's {what}={n}; the "
            f"factorizations of {n} are {options} (either order)"
        )
    return a, b


def _linear_default_variance(in_features: int) -> float:
    """Weight variance of nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in)) -> 1 / (3 in)."""
    return 1.0 / (3.0 * in_features)


class KroneckerLinear(nn.Module):
    """``y = x W^T + b`` with ``W = sum_r A_r (x) B_r`` (see the module docstring).

    Args:
        in_features, out_features, bias: as in ``nn.Linear``.
        rank: number R of Kronecker terms (more terms: more parameters, more expressive).
        in_factors: ``(i1, i2)`` with ``i1 * i2 = in_features`` (default: closest to sqrt).
        out_factors: ``(o1, o2)`` with ``o1 * o2 = out_features`` (default: closest to sqrt).
        init_std: standard deviation of the entries of W at initialisation (default: that of
            nn.Linear's init, ``1 / sqrt(3 in)``). Factors are drawn N(0, s^2) with
            ``R s^4 = init_std^2``, so ``Var(W_ij) = init_std^2`` and the output variance of a
            fresh layer equals that of a dense layer with that weight variance.
        generator: torch.Generator for the initialisation (reproducible builds).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int = 1,
        in_factors: tuple[int, int] | None = None,
        out_factors: tuple[int, int] | None = None,
        init_std: float | None = None,
        generator: torch.Generator | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int (number of Kronecker terms), got {rank!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.i1, self.i2 = _check_factors(self.in_features, in_factors, "in_features")
        self.o1, self.o2 = _check_factors(self.out_features, out_factors, "out_features")
        self.rank = rank
        kw = {"device": device, "dtype": dtype}
        self.outer = nn.Parameter(torch.empty(self.o1, rank * self.i1, **kw))
        self.inner = nn.Parameter(torch.empty(rank * self.o2, self.i2, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_features, **kw)) if bias else None
        self.reset_parameters(init_std, generator=generator)

    def reset_parameters(self, init_std: float | None = None, *, generator: torch.Generator | None = None) -> None:
        var = _linear_default_variance(self.in_features) if init_std is None else float(init_std) ** 2
        if not math.isfinite(var) or var < 0:
            raise ValueError(f"init_std must be a finite number >= 0, got {init_std!r}")
        s = (var / self.rank) ** 0.25
        with torch.no_grad():
            self.outer.normal_(0.0, s, generator=generator)
            self.inner.normal_(0.0, s, generator=generator)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound, generator=generator)

    @property
    def num_weights(self) -> int:
        return self.outer.numel() + self.inner.numel()

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The R pairs (A_r [o1, i1], B_r [o2, i2])."""
        a = self.outer.view(self.o1, self.rank, self.i1)
        b = self.inner.view(self.rank, self.o2, self.i2)
        return [(a[:, r], b[r]) for r in range(self.rank)]

    def dense_weight(self) -> torch.Tensor:
        """W [out, in] (for tests and export; the forward pass never forms it)."""
        return sum(torch.kron(a, b) for a, b in self.factors())

    def factor_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The vectors each factor's rows act on, as [M, cols] (for proxy Hessians E[v v^T]):
        ``inner`` acts on the rows of every X [i1, i2], ``outer`` on the stacked columns of
        [X B_1^T; ...; X B_R^T] [R i1, o2] (with the current ``inner``)."""
        xm = x.detach().reshape(-1, self.i1, self.i2)
        u = torch.matmul(xm, self.inner.detach().t()).view(-1, self.i1, self.rank, self.o2)
        return {"inner": xm.reshape(-1, self.i2),
                "outer": u.permute(0, 3, 2, 1).reshape(-1, self.rank * self.i1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        lead = x.shape[:-1]
        xm = x.reshape(-1, self.i1, self.i2)
        n = xm.shape[0]
        # [N, i1, R o2] = X B_r^T for every r (one GEMM), then rows (r, c) to match outer's columns
        u = torch.matmul(xm, self.inner.t()).view(n, self.i1, self.rank, self.o2)
        u = u.transpose(1, 2).reshape(n, self.rank * self.i1, self.o2)  # a view when R = 1
        a = self.outer.expand(n, self.o1, self.rank * self.i1)  # stride-0 batch: no copy
        if self.bias is None:
            y = torch.bmm(a, u)
        else:  # y = b + sum_r A_r X B_r^T, written once in its final layout
            y = torch.baddbmm(self.bias.view(1, self.o1, self.o2), a, u)
        return y.reshape(*lead, self.out_features)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, rank: int = 1, in_factors=None, out_factors=None
    ) -> KroneckerLinear:
        """The nearest sum of ``rank`` Kronecker products to ``linear.weight`` in Frobenius norm
        (Van Loan & Pitsianis 1993): rearrange W into R(W) [o1 i1, o2 i2] with
        ``R[(a, c), (b, d)] = W[(a, b), (c, d)]``, so that ``sum_r A_r (x) B_r`` corresponds to
        ``sum_r vec(A_r) vec(B_r)^T``, and keep the top ``rank`` singular triplets. The bias is copied."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, rank=rank,
                    in_factors=in_factors, out_factors=out_factors, device=w.device, dtype=w.dtype)
        o1, o2, i1, i2 = layer.o1, layer.o2, layer.i1, layer.i2
        if rank > min(o1 * i1, o2 * i2):
            raise ValueError(f"rank={rank} exceeds the rank of the rearranged weight, min({o1 * i1}, {o2 * i2})")
        r = w.to(torch.float64).reshape(o1, o2, i1, i2).permute(0, 2, 1, 3).reshape(o1 * i1, o2 * i2)
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        root = s[:rank].sqrt()
        a = (u[:, :rank] * root).t().reshape(rank, o1, i1)  # vec(A_r) row-major over (a, c)
        b = (vh[:rank] * root[:, None]).reshape(rank, o2, i2)
        with torch.no_grad():
            layer.outer.copy_(a.permute(1, 0, 2).reshape(o1, rank * i1))
            layer.inner.copy_(b.reshape(rank * o2, i2))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"factors=({self.o1}x{self.i1}) (x) ({self.o2}x{self.i2}), bias={self.bias is not None}")
