"""Compression spec strings and the seeded model builder they describe.

A spec names a parametrization of our GPT, e.g. ``"dense"``, ``"kron"``, ``"kron:rank=2"``,
``"monarch:blocks=4"``, ``"subspace:d=2000"`` or ``"kron:rank=2+subspace:d=1000"`` (a structured
GPT trained in a subspace). Grammar: steps joined by ``+``, each ``kind[:key=value,...]``;
at most one structured step (kron / monarch), then at most one subspace step.

* ``dense``: the plain GPT (trained fully, then post-training quantized).
* ``kron``: every untied ``nn.Linear`` (``layers=`` fnmatch patterns joined by ``|`` to choose)
  becomes a :class:`~tokenbounds.compress.kronecker.KroneckerLinear`; ``rank`` (default 1).
* ``monarch``: same with :class:`~tokenbounds.compress.monarch.MonarchLinear`; ``blocks``
  (default 4), ``inner`` (default ``ceil(min(in, out) / blocks)``, at least ``blocks``).
* ``subspace``: every trainable parameter in a seeded d-dimensional subspace
  (:class:`~tokenbounds.compress.subspace.SubspaceModel`); ``d`` (required), ``projector``
  (``kron`` or ``dense``), ``lr`` (Adam learning rate for z; default :func:`subspace_lr`).

``build_model(config, spec, seed=s)`` builds the model a spec describes from a seed, bit for bit
the same on every call (the decoder calls :func:`build_base` too): GPT init from
``torch.manual_seed(s)`` (in a forked RNG, so the caller's global RNG is untouched), structured
layers from a generator seeded with ``s + 1``, the projector from ``s + 2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SUBSPACE_LR_SCALE",
    "CompressionSpec",
    "SpecStep",
    "build_base",
    "build_model",
    "parse_spec",
    "subspace_lr",
    "subspace_seed",
]

# Adam moves every coordinate of z by about lr per step and P has orthonormal columns, so a step
# moves each of the D parameters by about lr sqrt(d / D): matching the dense learning rate asks
# for lr_z ~ lr sqrt(D / d). A sweep of lr_z in {0.03, 0.1, 0.3, 1} at d in {1000, 4000, 16000}
# (demo corpus, d_model 48, D = 54,480, 200 steps of 32 x 32 tokens, dense lr 0.01) put the best
# loss at 0.1-0.3, 0.1 and 0.03: about SUBSPACE_LR_SCALE times that rule. Chosen on the demo
# corpus, so it is one of the hyper-parameters the demo's selection bits pay for.
SUBSPACE_LR_SCALE = 2.0


def subspace_lr(base_lr: float, num_parameters: int, dim: int) -> float:
    """Default Adam learning rate of the subspace coordinates: ``2 lr sqrt(D / d)``."""
    return SUBSPACE_LR_SCALE * float(base_lr) * (num_parameters / dim) ** 0.5

_OPTIONS: dict[str, dict[str, type]] = {
    "dense": {},
    "kron": {"rank": int, "layers": str},
    "monarch": {"blocks": int, "inner": int, "layers": str},
    "subspace": {"d": int, "projector": str, "lr": float},
}
_REQUIRED = {"subspace": ("d",)}
_PENDING = {
    "lora": "LoRA adapters come from tokenbounds.compress.lora (issue 13), not merged on this branch",
    "sublora": "SubLoRA = LoRA adapters (tokenbounds.compress.lora, issue 13, not merged on this branch) "
               "+ subspace; use 'subspace:d=...' over all parameters meanwhile",
}


@dataclass(frozen=True)
class SpecStep:
    kind: str
    options: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def __str__(self) -> str:
        if not self.options:
            return self.kind
        return self.kind + ":" + ",".join(f"{k}={v}" for k, v in self.options)


@dataclass(frozen=True)
class CompressionSpec:
    """A parsed spec: ``structure`` (kron / monarch step or None) and ``subspace`` (or None)."""

    structure: SpecStep | None = None
    subspace: SpecStep | None = None
    steps: tuple[SpecStep, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        return "+".join(str(s) for s in self.steps) or "dense"

    @property
    def kind(self) -> str:
        return str(self.steps[-1].kind) if self.steps else "dense"


def _convert(kind: str, key: str, raw: str) -> Any:
    typ = _OPTIONS[kind][key]
    try:
        val = typ(raw)
    except ValueError:
        raise ValueError(f"option {key}={raw!r} of {kind!r} must be a{'n int' if typ is int else ' ' + typ.__name__}") from None
    if typ is int and val < 1:
        raise ValueError(f"option {key}={raw!r} of {kind!r} must be >= 1")
    if typ is float and not val > 0:
        raise ValueError(f"option {key}={raw!r} of {kind!r} must be > 0")
    if key == "projector" and val not in ("kron", "dense"):
        raise ValueError(f"projector must be 'kron' or 'dense', got {raw!r}")
    return val


def parse_spec(spec: str | CompressionSpec) -> CompressionSpec:
    """Parse a spec string (see the module docstring); clear ValueError on anything unknown."""
    if isinstance(spec, CompressionSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a compression spec must be a non-empty string like 'kron:rank=2', got {spec!r}")
    steps: list[SpecStep] = []
    for part in spec.strip().split("+"):
        kind, _, rest = part.strip().partition(":")
        kind = kind.strip()
        if kind in _PENDING:
            raise ValueError(f"compression {kind!r} is not available here: {_PENDING[kind]}")
        if kind not in _OPTIONS:
            raise ValueError(f"unknown compression {kind!r} in spec {spec!r}; known: {', '.join(_OPTIONS)}")
        opts: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or key not in _OPTIONS[kind]:
                known = ", ".join(_OPTIONS[kind]) or "none"
                raise ValueError(f"bad option {item!r} for {kind!r} (options: {known}; write key=value)")
            if key in opts:
                raise ValueError(f"option {key!r} given twice for {kind!r}")
            opts[key] = _convert(kind, key, raw.strip())
        for key in _REQUIRED.get(kind, ()):
            if key not in opts:
                raise ValueError(f"{kind!r} needs the option {key}=..., e.g. '{kind}:{key}=2000'")
        steps.append(SpecStep(kind, tuple(opts.items())))
    kinds = [s.kind for s in steps]
    if "dense" in kinds and len(steps) > 1:
        raise ValueError(f"'dense' cannot be combined with other steps in {spec!r}")
    structure = [s for s in steps if s.kind in ("kron", "monarch")]
    subspace = [s for s in steps if s.kind == "subspace"]
    if len(structure) > 1 or len(subspace) > 1:
        raise ValueError(f"spec {spec!r} has more than one structured or subspace step")
    if subspace and steps[-1].kind != "subspace":
        raise ValueError(f"the subspace step must come last in {spec!r} (it wraps the built model)")
    real = tuple(s for s in steps if s.kind != "dense")
    return CompressionSpec(structure=structure[0] if structure else None,
                           subspace=subspace[0] if subspace else None, steps=real)


def subspace_seed(seed: int) -> int:
    """Seed of the projector of a model built from ``seed``."""
    return int(seed) + 2


def build_base(config, spec: str | CompressionSpec, *, seed: int = 0):
    """The GPT ``spec`` describes before any subspace wrapping, built from ``seed`` (see the module
    docstring): a :class:`~tokenbounds.models.gpt.GPT`, its linears swapped for structured ones
    when the spec has a kron / monarch step."""
    import torch

    from ..models.gpt import GPT
    from .swap import replace_linears

    sp = parse_spec(spec)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
        raise ValueError(f"seed must be an int in [0, 2**62), got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(config)
    if sp.structure is not None:
        opts = dict(sp.structure.options)
        layers = opts.pop("layers", None)
        include = layers.split("|") if layers else None
        replace_linears(model, sp.structure.kind, include=include, init="match", seed=seed + 1, **opts)
    return model


def build_model(config, spec: str | CompressionSpec, *, seed: int = 0):
    """:func:`build_base`, wrapped in a :class:`~tokenbounds.compress.subspace.SubspaceModel`
    (projector seed :func:`subspace_seed`) for a spec with a subspace step."""
    from .subspace import SubspaceModel

    sp = parse_spec(spec)
    model = build_base(config, sp, seed=seed)
    if sp.subspace is not None:
        model = SubspaceModel(model, sp.subspace.get("d"), seed=subspace_seed(seed),
                              projector=sp.subspace.get("projector", "kron"))
    return model
