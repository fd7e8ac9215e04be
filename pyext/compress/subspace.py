"""Subspace training (SubLoRA's second half): ``theta = theta_0 + P z`` with only z trainable.

Li et al. (2018, "Measuring the intrinsic dimension of objective landscapes") train a network in
a random d-dimensional affine subspace of its D parameters; Lotfi et al. (2022, "PAC-Bayes
compression bounds so tight that they can explain generalization") code the d coordinates z
instead of the D parameters, and SubLoRA (Lotfi et al. 2023, arXiv 2312.17173, section 4) does
this for the LoRA adapters (and the other trainable parameters) of a language model. The
projector P [D, d] is random but *seeded*: the decoder regenerates it from its seed, so it costs
only the seed. With theta_0 a seeded random init, the whole model then costs its architecture, two
seeds and the coded z.

:class:`SubspaceModel` wraps any module and works on whichever parameters have
``requires_grad=True`` when it is built (all of them for from-scratch training, the adapters and
whatever else is left trainable after LoRA), so it composes with any parametrization. The
wrapped module keeps theta_0 (frozen); ``forward`` runs it with theta_0 + P z through
``torch.func.functional_call``, so :func:`tokenbounds.eval.train.train` trains z unchanged, and
:meth:`SubspaceModel.materialize` returns a plain copy of the module carrying theta_0 + P z.

Projectors (``make_projector``), both with orthonormal columns (P^T P = I):

* ``"kron"`` (default; any D): P = the first D rows and first d columns of Q1 (x) Q2, where Q1
  [D1, d1] and Q2 [D2, d2] have Haar-random orthonormal columns (QR of seeded Gaussians, signs
  fixed by diag(R) > 0), D1 D2 >= D (the D1 D2 - D extra rows, none when D factors, usually a few:
  :func:`kron_shape` minimizes them) and d1 d2 >= d. Columns of a Kronecker product of matrices
  with orthonormal columns are orthonormal; dropping e extra rows lowers the smallest eigenvalue
  of P^T P by at most the squared norm of those rows (about e d / D). P z = vec(Q1 Z Q2^T)[:D]
  with Z = z zero-padded to [d1, d2]: memory D1 d1 + D2 d2, time ~ D min(d1, d2) per product,
  never the dense D x d matrix.
* ``"dense"``: a Haar-random [D, d] matrix with orthonormal columns, for small D d (reference).

The factors are generated in float64 from ``torch.Generator().manual_seed(seed)`` and
``torch.linalg.qr``; the same torch build on the same machine regenerates them bit for bit.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "PROJECTORS",
    "DenseProjector",
    "KroneckerProjector",
    "SubspaceModel",
    "kron_shape",
    "make_projector",
]

PROJECTORS = ("kron", "dense")
DENSE_MAX_ENTRIES = 1 << 26  # 0.5 GiB of float64


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def _check_dims(total: int, dim: int) -> tuple[int, int]:
    for what, v in (("D (parameter count)", total), ("d (subspace dimension)", dim)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    if dim > total:
        raise ValueError(
            f"subspace dimension d={dim} exceeds the number of trainable parameters D={total}; "
            f"choose d <= {total} (a subspace larger than the space does not exist)"
        )
    return int(total), int(dim)


def _haar_columns(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[n, k] float64 with Haar-random orthonormal columns (k <= n)."""
    g = torch.randn(n, k, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    return (q * sign).contiguous()


def kron_shape(total: int) -> tuple[int, int]:
    """(D1, D2), D1 <= D2, D1 D2 >= total, minimizing the D1 D2 - total dropped rows, with D1
    within a factor 4 of sqrt(total) (ties: closest to sqrt)."""
    r = math.isqrt(total)
    if r * r == total:
        return r, r
    d1 = np.arange(max(1, r // 4), r + 1, dtype=np.int64)
    d2 = -(-total // d1)
    waste = d1 * d2 - total
    best = int(np.lexsort((r - d1, waste))[0])
    return int(d1[best]), int(d2[best])


def _split_dim(dim: int, rows: int, cols: int) -> tuple[int, int]:
    """(d1, d2) with d1 <= rows, d2 <= cols, d1 d2 >= dim: among the splits whose aspect d1 : d2
    is within a factor 2 of rows : cols, the fewest padded coordinates (a lopsided split such as
    1 x d for a prime d would make P z = q1 (x) (Q2 z), a needlessly structured subspace)."""
    target = math.log(rows / cols)
    best = None
    for d1 in range(max(1, -(-dim // cols)), min(rows, dim) + 1):
        d2 = -(-dim // d1)
        if d2 > cols:
            continue
        off = abs(math.log(d1 / d2) - target)
        key = (0.0 if off <= math.log(2) else off, d1 * d2 - dim, off)
        if best is None or key < best[0]:
            best = (key, d1, d2)
    assert best is not None  # dim <= rows * cols
    return best[1], best[2]


class KroneckerProjector(nn.Module):
    """P = (Q1 (x) Q2)[:D, :d], seeded (see the module docstring). ``forward(z)`` = P z."""

    kind = "kron"

    def __init__(self, total: int, dim: int, seed: int = 0):
        super().__init__()
        self.total, self.dim = _check_dims(total, dim)
        self.seed = _check_seed(seed)
        self.rows, self.cols = kron_shape(self.total)
        self.d1, self.d2 = _split_dim(self.dim, self.rows, self.cols)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self.register_buffer("q1", _haar_columns(self.rows, self.d1, gen), persistent=False)
        self.register_buffer("q2", _haar_columns(self.cols, self.d2, gen), persistent=False)
        self._cast: dict = {}

    @property
    def dropped_rows(self) -> int:
        return self.rows * self.cols - self.total

    def _factors(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype == torch.float64 and self.q1.device == device:
            return self.q1, self.q2
        key = (dtype, str(device), self.q1.device)
        if key not in self._cast:
            self._cast = {key: (self.q1.to(device, dtype), self.q2.to(device, dtype))}
        return self._cast[key]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.matvec(z)

    def matvec(self, z: torch.Tensor) -> torch.Tensor:
        """P z [D] for z [d] (in z's dtype; differentiable)."""
        if z.shape != (self.dim,):
            raise ValueError(f"z must have shape ({self.dim},), got {tuple(z.shape)}")
        q1, q2 = self._factors(z.dtype, z.device)
        zm = nn.functional.pad(z, (0, self.d1 * self.d2 - self.dim)).view(self.d1, self.d2)
        if self.d1 <= self.d2:  # D1 D2 d1 + D2 d1 d2 multiply-adds
            m = q1 @ (zm @ q2.t())
        else:  # D1 D2 d2 + D1 d1 d2
            m = (q1 @ zm) @ q2.t()
        return m.reshape(-1)[: self.total]

    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        """P^T g [d] for g [D]."""
        if g.shape != (self.total,):
            raise ValueError(f"g must have shape ({self.total},), got {tuple(g.shape)}")
        q1, q2 = self._factors(g.dtype, g.device)
        gm = nn.functional.pad(g, (0, self.dropped_rows)).view(self.rows, self.cols)
        return (q1.t() @ gm @ q2).reshape(-1)[: self.dim]

    def dense(self) -> torch.Tensor:
        """The matrix P [D, d] in float64 (small D d only: tests, inspection)."""
        if self.total * self.dim > DENSE_MAX_ENTRIES:
            raise ValueError(f"P has {self.total * self.dim:,} entries; dense() is for D d <= {DENSE_MAX_ENTRIES:,}")
        return torch.kron(self.q1, self.q2)[: self.total, : self.dim]

    def extra_repr(self) -> str:
        return (f"D={self.total}, d={self.dim}, seed={self.seed}, ({self.rows}x{self.d1}) (x) "
                f"({self.cols}x{self.d2}), dropped rows {self.dropped_rows}")


class DenseProjector(nn.Module):
    """A seeded Haar-random P [D, d] with orthonormal columns, stored densely (small D d only)."""

    kind = "dense"

    def __init__(self, total: int, dim: int, seed: int = 0):
        super().__init__()
        self.total, self.dim = _check_dims(total, dim)
        self.seed = _check_seed(seed)
        if self.total * self.dim > DENSE_MAX_ENTRIES:
            raise ValueError(
                f"a dense projector would hold D d = {self.total * self.dim:,} entries (more than "
                f"{DENSE_MAX_ENTRIES:,}); use projector='kron', which never forms P"
            )
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self.register_buffer("p", _haar_columns(self.total, self.dim, gen), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.matvec(z)

    def matvec(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape != (self.dim,):
            raise ValueError(f"z must have shape ({self.dim},), got {tuple(z.shape)}")
        return self.p.to(z.device, z.dtype) @ z

    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        return self.p.to(g.device, g.dtype).t() @ g

    def dense(self) -> torch.Tensor:
        return self.p


def make_projector(kind: str, total: int, dim: int, seed: int = 0) -> nn.Module:
    """A seeded projector P [total, dim] (``kind`` in :data:`PROJECTORS`)."""
    if kind == "kron":
        return KroneckerProjector(total, dim, seed)
    if kind == "dense":
        return DenseProjector(total, dim, seed)
    raise ValueError(f"unknown projector {kind!r}; use one of {PROJECTORS}")


class SubspaceModel(nn.Module):
    """``module`` with its trainable parameters theta replaced by ``theta_0 + P z``; only the
    ``dim`` coordinates z (initialised at 0) are trainable.

    Args:
        module: any nn.Module; the parameters with ``requires_grad=True`` now form the
            D-dimensional space (tied parameters count once) and are frozen at their current
            values theta_0.
        dim: subspace dimension d (1 <= d <= D).
        seed: projector seed (the decoder regenerates P from it).
        projector: ``"kron"`` or ``"dense"`` (see the module docstring).

    ``forward`` calls the module's forward with theta_0 + P z; ``config`` is the module's (so
    :func:`tokenbounds.eval.train.train` accepts a wrapped GPT). ``materialize()`` gives the
    plain module carrying theta_0 + P z (computed in float64, then cast).
    """

    def __init__(self, module: nn.Module, dim: int, *, seed: int = 0, projector: str = "kron"):
        super().__init__()
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the module has no trainable parameters (requires_grad=True) to put in a subspace")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"trainable parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        self.module = module
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        total = sum(self.numels)
        self.projector = make_projector(projector, total, dim, seed)
        for _, p in named:
            p.requires_grad_(False)
        self.z = nn.Parameter(torch.zeros(dim, dtype=named[0][1].dtype, device=named[0][1].device))

    @property
    def config(self):
        return self.module.config

    @property
    def dim(self) -> int:
        return self.projector.dim

    @property
    def num_parameters(self) -> int:
        """D: the number of parameters the subspace lives in."""
        return self.projector.total

    @property
    def seed(self) -> int:
        return self.projector.seed

    def _base_flat(self) -> torch.Tensor:
        params = dict(self.module.named_parameters())
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def _split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes, strict=True)}

    def parameters_at(self, z: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """theta_0 + P z by parameter name (differentiable in z; default the current z)."""
        z = self.z if z is None else z
        base = self._base_flat()
        return self._split(base + self.projector(z.to(base.dtype)))

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.module, self.parameters_at(), args, kwargs)

    @torch.no_grad()
    def materialize(self, z: torch.Tensor | None = None) -> nn.Module:
        """A copy of the module carrying theta_0 + P z (float64 arithmetic, cast to the
        parameters' dtype); its subspace parameters are trainable again."""
        z = (self.z if z is None else z).detach().to(torch.float64)
        base = self._base_flat()
        flat = (base.to(torch.float64) + self.projector.matvec(z.to(base.device))).to(base.dtype)
        out = copy.deepcopy(self.module)
        params = dict(out.named_parameters())
        for name, value in self._split(flat).items():
            params[name].copy_(value)
            params[name].requires_grad_(True)
        return out

    def extra_repr(self) -> str:
        return f"d={self.dim}, D={self.num_parameters}, projector={self.projector.kind}, seed={self.seed}"
