"""LoRA adapters on the ``nn.Linear`` layers of any model, and the generic adapter machinery.

``LoRALinear`` computes ``y = base(x) + (alpha / r) (x A^T) B^T`` with the base layer frozen,
``A`` [r, in] initialised like ``nn.Linear`` (Kaiming-uniform, bound 1/sqrt(in)) and ``B`` [out, r]
at zero (Hu et al. 2021, arXiv 2106.09685, section 4.1), so the wrapped model equals the base model
until the first update. ``merge()`` folds ``Delta W = (alpha / r) B A`` into the base weight (for
inference, export or quantization); ``unmerge()`` subtracts it again (exact up to float rounding).

Other reparametrisations (SubLoRA, Kronecker, Monarch, ...) subclass :class:`LinearAdapter`,
implement ``delta_weight()`` (and, when cheaper than ``x Delta W^T``, ``adapter_forward``), and
are installed with :func:`wrap_linears` like LoRA is by :func:`apply_lora`.

A linear weight shared with another parameter (the LM head tied to the token embedding) is never
wrapped: merging into it would change the embedding too.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LinearAdapter",
    "LoRALinear",
    "adapters",
    "apply_lora",
    "merge_adapters",
    "remove_adapters",
    "trainable_parameters",
    "unmerge_adapters",
    "wrap_linears",
]


class LinearAdapter(nn.Module):
    """A frozen ``nn.Linear`` (``self.base``) plus a trainable update ``delta_weight()``."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"an adapter wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update ``Delta W`` [out, in] added to the base weight."""
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x Delta W^T`` (override when a factored product is cheaper)."""
        return F.linear(x, self.delta_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y if self.merged else y + self.adapter_forward(x)

    @torch.no_grad()
    def merge(self) -> None:
        """``W <- W + Delta W``; the forward then uses the base layer only (the adapter's
        parameters get no gradient while merged)."""
        if self.merged:
            raise RuntimeError("adapter is already merged")
        self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W <- W - Delta W`` (undoes :meth:`merge` up to float rounding)."""
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = False

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter's own parameters (everything but the base layer's)."""
        base = {id(p) for p in self.base.parameters()}
        return [p for p in self.parameters() if id(p) not in base]


class LoRALinear(LinearAdapter):
    """``y = base(x) + (alpha / r) (x A^T) B^T``; ``alpha`` defaults to ``r`` (scaling 1)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(base)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank!r}")
        if rank > min(base.in_features, base.out_features):
            raise ValueError(
                f"LoRA rank {rank} exceeds min(in_features, out_features) = "
                f"min({base.in_features}, {base.out_features}) of the layer: B A would not be a low-rank "
                f"update (a full-rank one costs more than the dense weight); choose rank <= "
                f"{min(base.in_features, base.out_features)} or exclude the layer"
            )
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        w = base.weight
        bound = 1.0 / math.sqrt(base.in_features)  # = kaiming_uniform_(a=sqrt(5)), nn.Linear's init
        a = torch.empty(rank, base.in_features, dtype=w.dtype)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def factor_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The vectors each factor's rows act on, as [M, cols] (proxy Hessians E[v v^T] for coding
        the factors, as :meth:`tokenbounds.compress.KroneckerLinear.factor_inputs`): ``lora_A`` acts on the layer input
        x, ``lora_B`` on ``scaling * A x``."""
        xm = x.detach().reshape(-1, self.in_features)
        return {"lora_A": xm, "lora_B": self.scaling * F.linear(xm, self.lora_A.detach())}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def _shared_weight_ids(model: nn.Module) -> set[int]:
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {i for i, c in counts.items() if c > 1}


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def wrap_linears(
    model: nn.Module,
    factory: Callable[[str, nn.Linear], LinearAdapter],
    targets: str | Iterable[str] = "*",
    *,
    exclude: str | Iterable[str] = (),
    freeze_base: bool = True,
) -> dict[str, LinearAdapter]:
    """Replace every ``nn.Linear`` whose module name matches a glob of ``targets`` (and none of
    ``exclude``) by ``factory(name, linear)``; with ``freeze_base`` every other parameter of the
    model is frozen, so the trainable parameters are exactly the adapters'. Linear weights tied
    to another parameter are skipped. Returns {module name: adapter}.

    Raises ValueError naming the model's linear layers when a target pattern selects no layer
    (a typo would otherwise silently train fewer adapters), and naming the layer when ``factory``
    rejects it.
    """
    pats = [targets] if isinstance(targets, str) else list(targets)
    excl = [exclude] if isinstance(exclude, str) else list(exclude)
    shared = _shared_weight_ids(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and not isinstance(m, LinearAdapter)]
    inside = {n for n, m in model.named_modules() if isinstance(m, LinearAdapter)}
    wrappable = [(n, m) for n, m in linears if not _matches(n, excl) and id(m.weight) not in shared
                 and not any(n.startswith(a + ".") for a in inside)]
    chosen = [(n, m) for n, m in wrappable if _matches(n, pats)]
    unmatched = [p for p in pats if not any(fnmatch.fnmatchcase(n, p) for n, _ in wrappable)]
    if not chosen or unmatched:
        names = [n for n, _ in linears]
        tied = [n for n, m in linears if id(m.weight) in shared]
        raise ValueError(
            f"no nn.Linear layer matches targets {unmatched or pats} (exclude {excl}); the model's linear layers are "
            f"{names[:20]}{' ...' if len(names) > 20 else ''}"
            + (f" (tied, never wrapped: {tied})" if tied else "")
            + (". GPT-2 style models use transformers' Conv1D, not nn.Linear" if not names else ""))
    made = []
    for name, lin in chosen:  # build every adapter first: a rejected layer leaves the model untouched
        try:
            made.append((name, factory(name, lin)))
        except ValueError as exc:
            raise ValueError(f"layer {name!r} ({lin.in_features} -> {lin.out_features}): {exc}") from None
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    out: dict[str, LinearAdapter] = {}
    for name, adapter in made:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        for p in adapter.adapter_parameters():
            p.requires_grad_(True)
        setattr(parent, child, adapter)
        out[name] = adapter
    return out


def apply_lora(
    model: nn.Module,
    rank: int,
    *,
    targets: str | Iterable[str] = "*",
    exclude: str | Iterable[str] = (),
    alpha: float | None = None,
    seed: int = 0,
) -> dict[str, LoRALinear]:
    """Wrap the matching ``nn.Linear`` layers of ``model`` (in place) with rank-``rank`` LoRA and
    freeze everything else. ``seed`` fixes the ``A`` initialisation (layer order = module order).

    Example: ``apply_lora(gpt, 4, targets=["blocks.*.attn.*"])``; then
    ``trainable_parameters(gpt)`` counts the LoRA parameters only.
    """
    gen = torch.Generator().manual_seed(int(seed))
    return wrap_linears(model, lambda _n, lin: LoRALinear(lin, rank, alpha, generator=gen),
                        targets, exclude=exclude)


def adapters(model: nn.Module) -> dict[str, LinearAdapter]:
    """{module name: adapter} for every adapter installed in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearAdapter)}


def merge_adapters(model: nn.Module) -> int:
    """Merge every unmerged adapter into its base weight; returns how many were merged."""
    todo = [a for a in adapters(model).values() if not a.merged]
    for a in todo:
        a.merge()
    return len(todo)


def unmerge_adapters(model: nn.Module) -> int:
    """Undo :func:`merge_adapters`; returns how many were unmerged."""
    todo = [a for a in adapters(model).values() if a.merged]
    for a in todo:
        a.unmerge()
    return len(todo)


def remove_adapters(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Put the plain ``nn.Linear`` layers back (merged with their update when ``merge``, else the
    update is dropped). Parameters keep their ``requires_grad``; ``model.requires_grad_(True)``
    makes everything trainable again."""
    for name, a in list(adapters(model).items()):
        if merge and not a.merged:
            a.merge()
        elif not merge and a.merged:
            a.unmerge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, a.base)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (``requires_grad``), each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
