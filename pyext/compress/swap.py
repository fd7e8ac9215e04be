"""Replace chosen ``nn.Linear`` modules of a built model with structured layers of the same shape
(from the outside: the model's own code, e.g. :class:`tokenbounds.models.gpt.GPT`, is untouched).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from .kronecker import KroneckerLinear
from .monarch import MonarchLinear

__all__ = ["INITS", "LAYER_KINDS", "linear_names", "replace_linears", "structured_layer"]

LAYER_KINDS = ("kron", "monarch")
INITS = ("match", "default", "project")


def structured_layer(
    kind: str,
    linear: nn.Linear,
    *,
    init: str = "match",
    generator: torch.Generator | None = None,
    **options,
) -> nn.Module:
    """A Kronecker (``kind="kron"``, options ``rank``, ``in_factors``, ``out_factors``) or Monarch
    (``kind="monarch"``, options ``blocks``, ``inner``) layer with the shape and bias of ``linear``.

    ``init``: ``"match"`` -- random factors whose product has the weight RMS of ``linear`` (so the
    model keeps its output scale; GPT's scaled residual init survives), bias copied;
    ``"default"`` -- nn.Linear's default variance and bias init; ``"project"`` -- the nearest
    structured matrix to ``linear.weight`` (``from_linear``), bias copied.
    """
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown structured layer kind {kind!r}; use one of {LAYER_KINDS}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    cls = KroneckerLinear if kind == "kron" else MonarchLinear
    w = linear.weight
    if init == "project":
        return cls.from_linear(linear, **options)
    std = None
    if init == "match":
        std = float(w.detach().to(torch.float64).pow(2).mean().sqrt())
    layer = cls(linear.in_features, linear.out_features, linear.bias is not None, init_std=std,
                generator=generator, device=w.device, dtype=w.dtype, **options)
    if init == "match" and linear.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(linear.bias.detach())
    return layer


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's ``nn.Linear`` modules, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _tied_linears(model: nn.Module) -> dict[str, str]:
    """Linear modules whose weight is also registered elsewhere (e.g. a head tied to the token
    embedding) -> the other name."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            names = owners.get(id(mod.weight), [])
            others = [n for n in names if n != f"{name}.weight"]
            if others:
                out[name] = others[0]
    return out


def replace_linears(
    model: nn.Module,
    kind: str | Callable[[str, nn.Linear], nn.Module],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    init: str = "match",
    seed: int | None = 0,
    **options,
) -> dict[str, nn.Module]:
    """Replace, in place, the ``nn.Linear`` modules of ``model`` selected by name with structured
    layers of the same shape; returns ``{name: new module}``.

    Args:
        model: a built model (its other modules are untouched).
        kind: ``"kron"`` or ``"monarch"`` (options as in :func:`structured_layer`), or a
            callable ``(name, linear) -> module`` for any other replacement.
        include: fnmatch patterns on module names (e.g. ``["blocks.*.mlp.*"]``); default: every
            linear whose weight is not tied to another parameter. A pattern that matches no
            linear, or an explicitly included tied linear, is an error.
        exclude: patterns removed from the selection.
        init: see :func:`structured_layer`.
        seed: seeds the random initialisation (one torch.Generator for all layers, in module
            order), so the same call on the same model builds the same layers; None uses the
            global RNG.

    Raises ValueError (with the offending layer's name) when factor shapes do not divide a layer.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tied = _tied_linears(model)
    if include is None:
        chosen = [n for n in linears if n not in tied]
    else:
        chosen = []
        for pat in include:
            hits = [n for n in linears if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ValueError(f"pattern {pat!r} matches no nn.Linear of the model; its linears are {list(linears)}")
            chosen += [n for n in hits if n not in chosen]
        bad = [n for n in chosen if n in tied]
        if bad:
            raise ValueError(
                f"{bad[0]}.weight is tied to {tied[bad[0]]}; replacing it would untie the two. "
                "Exclude it (or untie the weights first)"
            )
    chosen = [n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if not chosen:
        raise ValueError("no nn.Linear selected: check include/exclude")
    gen = None
    if seed is not None and not callable(kind):
        gen = torch.Generator(device=linears[chosen[0]].weight.device).manual_seed(int(seed))
    new: dict[str, nn.Module] = {}
    for name in chosen:
        lin = linears[name]
        try:
            mod = kind(name, lin) if callable(kind) else structured_layer(kind, lin, init=init, generator=gen, **options)
        except ValueError as exc:
            raise ValueError(f"layer {name!r} ({lin.in_features} -> {lin.out_features}): {exc}") from None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, mod)
        new[name] = mod
    return new
