"""Monarch linear layer (Dao et al. 2022, "Monarch: Expressive Structured Matrices for Efficient
and Accurate Training", ICML): block-diagonal x permutation x block-diagonal, a drop-in for
``nn.Linear``.

With ``b`` blocks and an inner width ``k`` per block, ``W = L P R`` where

* R = diag(R_1, ..., R_b), R_l: [k, in/b] -- block l of the input to k middle values;
* P is the permutation that reads the middle vector laid out as [b, k] (block, index) in
  column order, i.e. as [k, b] row-major, and cuts it into b groups of k consecutive entries;
* L = diag(L_1, ..., L_b), L_j: [out/b, k] -- group j to block j of the output.

For square n = m^2 with b = k = m, P is Dao et al.'s reshape-transpose permutation and W is
their Monarch matrix M = P L P^T R up to that permutation of the outputs (W = P^T M). Group j holds middle entries (l, q) with ``j k <= q b + l <
(j + 1) k``; a run of k >= b consecutive entries covers every block l, so every output depends
on every input exactly when ``k >= b`` (required here). Weights: ``k (in + out)`` instead of
``in * out``. The forward pass is two batched matmuls and a transpose; W is never formed.

Storage (2-D, so :func:`tokenbounds.quant.quantize_weight` codes them directly):
``right`` [b k, in/b] (the R_l stacked) and ``left`` [out, k] (the L_j stacked).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .kronecker import _linear_default_variance

__all__ = ["MonarchLinear", "default_inner"]


def default_inner(in_features: int, out_features: int, blocks: int) -> int:
    """Inner width per block: ``ceil(min(in, out) / b)``, at least b (full connectivity).

    For square n = m^2 and b = m this is Dao et al.'s k = m (2 n sqrt(n) weights)."""
    return max(blocks, -(-min(in_features, out_features) // blocks))


class MonarchLinear(nn.Module):
    """``y = x W^T + b`` with ``W = L P R`` (see the module docstring).

    Args:
        in_features, out_features, bias: as in ``nn.Linear``; both feature counts must be
            divisible by ``blocks``.
        blocks: number b of diagonal blocks of each factor.
        inner: middle width k per block (default :func:`default_inner`); must be >= blocks.
        init_std: standard deviation of W's entries at init (default nn.Linear's
            ``1 / sqrt(3 in)``): R ~ N(0, b / in) (unit variance middle values for unit inputs)
            and L ~ N(0, in init_std^2 / k), so the output variance equals that of a dense layer.
        generator: torch.Generator for the initialisation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocks: int = 4,
        inner: int | None = None,
        init_std: float | None = None,
        generator: torch.Generator | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks must be a positive int, got {blocks!r}")
        for what, n in (("in_features", in_features), ("out_features", out_features)):
            if n % blocks:
                divisors = [b for b in range(1, n + 1) if n % b == 0 and b <= 64]
                raise ValueError(
                    f"{what}={n} is not divisible by blocks={blocks}: Monarch blocks must divide both "
                    f"feature counts (divisors of {n}: {divisors}); choose another block count or "
                    "exclude the layer"
                )
        k = default_inner(in_features, out_features, blocks) if inner is None else inner
        if isinstance(k, bool) or not isinstance(k, int) or k < blocks:
            raise ValueError(
                f"inner={inner!r} must be an int >= blocks={blocks}: with fewer middle values per "
                "block some outputs would not depend on some inputs"
            )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.blocks, self.inner = blocks, k
        kw = {"device": device, "dtype": dtype}
        self.right = nn.Parameter(torch.empty(blocks * k, in_features // blocks, **kw))
        self.left = nn.Parameter(torch.empty(out_features, k, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters(init_std, generator=generator)

    def reset_parameters(self, init_std: float | None = None, *, generator: torch.Generator | None = None) -> None:
        var = _linear_default_variance(self.in_features) if init_std is None else float(init_std) ** 2
        if not math.isfinite(var) or var < 0:
            raise ValueError(f"init_std must be a finite number >= 0, got {init_std!r}")
        with torch.no_grad():
            self.right.normal_(0.0, math.sqrt(self.blocks / self.in_features), generator=generator)
            self.left.normal_(0.0, math.sqrt(self.in_features * var / self.inner), generator=generator)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound, generator=generator)

    @property
    def num_weights(self) -> int:
        return self.right.numel() + self.left.numel()

    def _permute(self, mid: torch.Tensor) -> torch.Tensor:
        """[b, N, k] (block-major middle values) -> [b, N, k] (the b groups of P)."""
        b, n, k = mid.shape
        return mid.permute(1, 2, 0).reshape(n, b, k).transpose(0, 1)

    def factor_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The vectors each factor's rows act on, as [M, cols] (for proxy Hessians E[v v^T]),
        pooled over blocks: ``right`` acts on the input blocks x_l [in/b], ``left`` on the
        middle groups [k]. Pooling gives one Hessian per factor (what ``quantize_weight``
        takes); the exact proxy Hessian differs per block."""
        b, k = self.blocks, self.inner
        xb = x.detach().reshape(-1, b, self.in_features // b).transpose(0, 1)
        mid = torch.bmm(xb, self.right.detach().view(b, k, -1).transpose(1, 2))
        return {"right": xb.reshape(-1, xb.shape[-1]), "left": self._permute(mid).reshape(-1, k)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        b, k = self.blocks, self.inner
        lead = x.shape[:-1]
        xb = x.reshape(-1, b, self.in_features // b).transpose(0, 1)  # [b, N, in/b]
        mid = torch.bmm(xb, self.right.view(b, k, -1).transpose(1, 2))  # [b, N, k] = R_l x_l
        groups = self._permute(mid)  # [b, N, k]
        y = torch.bmm(groups, self.left.view(b, -1, k).transpose(1, 2))  # [b, N, out/b]
        y = y.transpose(0, 1).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def group_members(self) -> list[list[tuple[int, int]]]:
        """For each group j, the middle entries (block, index q) it holds, in order."""
        b, k = self.blocks, self.inner
        flat = [(blk, q) for q in range(k) for blk in range(b)]  # [k, b] row-major
        return [flat[j * k:(j + 1) * k] for j in range(b)]

    def dense_weight(self) -> torch.Tensor:
        """W [out, in] (for tests and export; the forward pass never forms it)."""
        b, k = self.blocks, self.inner
        r = self.right.view(b, k, -1)
        lft = self.left.view(b, -1, k)
        rows = []
        for j, members in enumerate(self.group_members()):
            blocks = [torch.zeros(lft.shape[1], r.shape[2], dtype=r.dtype, device=r.device) for _ in range(b)]
            for p, (blk, q) in enumerate(members):
                blocks[blk] = blocks[blk] + torch.outer(lft[j][:, p], r[blk][q])
            rows.append(torch.cat(blocks, dim=1))
        return torch.cat(rows, dim=0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocks: int = 4, inner: int | None = None) -> MonarchLinear:
        """The nearest Monarch matrix to ``linear.weight`` in Frobenius norm.

        Block (j, l) of W [out/b, in/b] equals ``sum_{(l, q) in group j} L_j[:, p] R_l[q, :]``,
        and every L column / R row belongs to exactly one block pair, so the projection splits into
        independent truncated SVDs of the b^2 blocks, block (j, l) to rank |group j cap block l|
        (Dao et al. 2022, section 3.4, for the square case). The bias is copied.
        """
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, blocks=blocks,
                    inner=inner, device=w.device, dtype=w.dtype)
        b, k = layer.blocks, layer.inner
        ob, ib = layer.out_features // b, layer.in_features // b
        w64 = w.to(torch.float64)
        right = torch.zeros(b, k, ib, dtype=torch.float64)
        left = torch.zeros(b, ob, k, dtype=torch.float64)
        for j, members in enumerate(layer.group_members()):
            for l_blk in range(b):
                slots = [(p, q) for p, (blk, q) in enumerate(members) if blk == l_blk]
                if not slots:
                    continue
                u, s, vh = torch.linalg.svd(w64[j * ob:(j + 1) * ob, l_blk * ib:(l_blk + 1) * ib], full_matrices=False)
                for t, (p, q) in enumerate(slots):
                    if t < s.numel():
                        root = s[t].sqrt()
                        left[j, :, p] = u[:, t] * root
                        right[l_blk, q] = vh[t] * root
        with torch.no_grad():
            layer.right.copy_(right.reshape(b * k, ib))
            layer.left.copy_(left.reshape(b * ob, k))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.blocks}, "
                f"inner={self.inner}, bias={self.bias is not None}")
