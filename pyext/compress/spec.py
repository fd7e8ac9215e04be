"""Compression spec strings and the seeded model builder they describe.

A spec names a parametrization of our GPT, e.g. ``"dense"``, ``"kron"``, ``"kron:rank=2"``,
``"monarch:blocks=4"``, ``"subspace:d=2000"``, ``"kron:rank=2+subspace:d=1000"`` (a structured
GPT trained in a subspace), ``"lora:rank=4"`` or ``"sublora:rank=4,d=2000"``. Grammar: steps
joined by ``+``, each ``kind[:key=value,...]``; at most one structured step (kron / monarch), then
at most one subspace step; ``lora`` and ``sublora`` stand alone.

* ``dense``: the plain GPT (trained fully, then post-training quantized).
* ``kron``: every untied ``nn.Linear`` (``layers=`` fnmatch patterns joined by ``|`` to choose)
  becomes a :class:`~tokenbounds.compress.kronecker.KroneckerLinear`; ``rank`` (default 1).
* ``monarch``: same with :class:`~tokenbounds.compress.monarch.MonarchLinear`; ``blocks``
  (default 4), ``inner`` (default ``ceil(min(in, out) / blocks)``, at least ``blocks``).
* ``subspace``: every trainable parameter in a seeded d-dimensional subspace
  (:class:`~tokenbounds.compress.subspace.SubspaceModel`); ``d`` (required), ``projector``
  (``kron`` or ``dense``), ``lr`` (Adam learning rate for z; default :func:`subspace_lr`).
* ``lora``: LoRA adapters (:func:`~tokenbounds.compress.lora.apply_lora`) of rank ``rank``
  (required, at most min(in, out) of every chosen layer) on the untied linears matching
  ``targets`` (fnmatch patterns on module names joined by ``|``, default ``*``; every pattern must
  select a layer), scaling ``alpha / rank`` (``alpha`` default ``rank``). Only the adapters and
  the parameters named by ``train`` (default ``none``) are trained and coded; everything else is
  the frozen base.
* ``sublora``: SubLoRA (Lotfi et al. 2023, arXiv 2312.17173, section 4): the ``lora`` adapters
  (options ``rank``, ``targets``, ``alpha``) *and* the parameters named by ``train`` (default
  ``embeddings|norms|biases``) in one seeded d-dimensional subspace (options ``d``,
  ``projector``, ``lr`` of ``subspace``); only z is coded.

``train`` (of lora / sublora): ``none``, or ``|``-joined items, each a keyword -- ``embeddings``
(every ``nn.Embedding``; our GPT's token embedding is also its tied LM head), ``norms`` (every
``nn.LayerNorm``), ``biases`` (every parameter named ``*.bias`` outside the norms: the biases of
the wrapped linears) -- or an fnmatch pattern on parameter names; each item must name a
parameter.

``base`` (of lora / sublora): ``init`` (default: the seeded init) or the name of a pretrained
base the caller supplies as ``base_weights`` (see below); ``tokenbounds demo`` reads it as a
quantizer label of its grid, e.g. ``base=uniform4-ldlq``: the demo's dense model quantized with it.

**The frozen base.** By default these specs build the model from scratch, as the demo trains its
models, so the base the adapters are added to is the *seeded random init* of the GPT: it costs
only its seed (and the architecture) in the code, as in Lotfi et al. (2024, arXiv 2407.18158),
who train SubLoRA from a random init. A LoRA-only model then learns a low-rank update of random
weights on top of a random, frozen token embedding; ``train=embeddings|...`` (SubLoRA's default)
trains the embedding too, inside the subspace, where it costs no extra coded bits. A *pretrained*
base is ``base_weights=`` (a :class:`tokenbounds.quant.QuantizedModel` of the plain architecture,
e.g. the demo's post-training-quantized model) of :func:`build_model`,
:func:`tokenbounds.compress.train_candidate` and :func:`tokenbounds.compress.compress_candidate`:
the adapters train on its decoded weights and the message carries its code, counted in full.

``build_model(config, spec, seed=s)`` builds the model a spec describes from a seed, bit for bit
the same on every call (the decoder calls :func:`build_base` too): GPT init from
``torch.manual_seed(s)`` (in a forked RNG, so the caller's global RNG is untouched), structured
layers from a generator seeded with ``s + 1``, the projector from ``s + 2``, the LoRA ``A``
factors from ``s + 3``.
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
    "lora_seed",
    "parse_spec",
    "pretrained_base",
    "split_specs",
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

_LORA_OPTIONS: dict[str, type] = {"rank": int, "targets": str, "alpha": float, "train": str, "base": str}
_SUBSPACE_OPTIONS: dict[str, type] = {"d": int, "projector": str, "lr": float}
_OPTIONS: dict[str, dict[str, type]] = {
    "dense": {},
    "kron": {"rank": int, "layers": str},
    "monarch": {"blocks": int, "inner": int, "layers": str},
    "subspace": _SUBSPACE_OPTIONS,
    "lora": _LORA_OPTIONS,
    "sublora": {**_LORA_OPTIONS, **_SUBSPACE_OPTIONS},
}
_REQUIRED = {"subspace": ("d",), "lora": ("rank",), "sublora": ("rank", "d")}
_EXAMPLES = {"d": "2000", "rank": "4"}
TRAIN_DEFAULTS = {"lora": "none", "sublora": "embeddings|norms|biases"}
TRAIN_KEYWORDS = ("embeddings", "norms", "biases")


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
    """A parsed spec: ``structure`` (kron / monarch step or None), ``adapter`` (the ``lora``
    options of a lora / sublora spec, ``train`` filled in, or None) and ``subspace`` (or None;
    a sublora spec has both)."""

    structure: SpecStep | None = None
    subspace: SpecStep | None = None
    steps: tuple[SpecStep, ...] = field(default=(), repr=False)
    adapter: SpecStep | None = None

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
    if key in ("targets", "train", "layers") and not all(p.strip() for p in val.split("|")):
        raise ValueError(f"option {key}={raw!r} of {kind!r} has an empty pattern; join patterns with '|'")
    if key == "train" and "none" in val.split("|") and val != "none":
        raise ValueError(f"train={raw!r}: 'none' cannot be combined with other items")
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
                example = ",".join(f"{k}={_EXAMPLES[k]}" for k in _REQUIRED[kind])
                raise ValueError(f"{kind!r} needs the option {key}=..., e.g. '{kind}:{example}'")
        steps.append(SpecStep(kind, tuple(opts.items())))
    kinds = [s.kind for s in steps]
    if "dense" in kinds and len(steps) > 1:
        raise ValueError(f"'dense' cannot be combined with other steps in {spec!r}")
    adapter = [s for s in steps if s.kind in ("lora", "sublora")]
    if adapter and len(steps) > 1:
        hint = (" (LoRA wraps nn.Linear layers, kron / monarch replace them)" if any(
            k in ("kron", "monarch") for k in kinds) else
            "; LoRA in a subspace is 'sublora:rank=...,d=...'" if "subspace" in kinds else "")
        raise ValueError(f"{adapter[0].kind!r} cannot be combined with other steps in {spec!r}{hint}")
    if adapter:
        step = adapter[0]
        opts = dict(step.options)
        lora = {k: opts[k] for k in _LORA_OPTIONS if k in opts}
        lora.setdefault("train", TRAIN_DEFAULTS[step.kind])
        sub = {k: opts[k] for k in _SUBSPACE_OPTIONS if k in opts} if step.kind == "sublora" else None
        return CompressionSpec(subspace=SpecStep("subspace", tuple(sub.items())) if sub else None,
                               steps=(step,), adapter=SpecStep("lora", tuple(lora.items())))
    structure = [s for s in steps if s.kind in ("kron", "monarch")]
    subspace = [s for s in steps if s.kind == "subspace"]
    if len(structure) > 1 or len(subspace) > 1:
        raise ValueError(f"spec {spec!r} has more than one structured or subspace step")
    if subspace and steps[-1].kind != "subspace":
        raise ValueError(f"the subspace step must come last in {spec!r} (it wraps the built model)")
    real = tuple(s for s in steps if s.kind != "dense")
    return CompressionSpec(structure=structure[0] if structure else None,
                           subspace=subspace[0] if subspace else None, steps=real)


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs (``tokenbounds demo --compression``), where a spec's
    own options are comma-separated too: an item ``key=value`` without a ``:`` continues the
    previous spec, anything else starts a new one. ``"sublora:rank=4,d=2000,kron"`` ->
    ``["sublora:rank=4,d=2000", "kron"]``."""
    out: list[str] = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty spec in the list {text!r}; separate specs with single commas")
        if "=" in item and ":" not in item and "+" not in item:
            if not out:
                raise ValueError(f"the list {text!r} starts with an option ({item!r}), not a spec such as 'kron'")
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def pretrained_base(spec: str | CompressionSpec) -> str | None:
    """The ``base=`` name of a lora / sublora spec trained on a pretrained base (None: the seeded
    init, or a spec without adapters)."""
    sp = parse_spec(spec)
    if sp.adapter is None:
        return None
    base = sp.adapter.get("base", "init")
    return None if base == "init" else base


def subspace_seed(seed: int) -> int:
    """Seed of the projector of a model built from ``seed``."""
    return int(seed) + 2


def lora_seed(seed: int) -> int:
    """Seed of the LoRA ``A`` initialisation of a model built from ``seed``."""
    return int(seed) + 3


def _train_items(model, train: str) -> list[str]:
    """Names of the parameters a ``train=`` option selects (see the module docstring)."""
    import fnmatch

    import torch.nn as nn

    if train == "none":
        return []
    names: list[str] = []
    norm_names = {f"{m}.{p}" if m else p for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
                  for p, _ in mod.named_parameters(recurse=False)}
    params = [n for n, _ in model.named_parameters()]
    for item in train.split("|"):
        item = item.strip()
        if item == "embeddings":
            hits = [f"{m}.{p}" if m else p for m, mod in model.named_modules() if isinstance(mod, nn.Embedding)
                    for p, _ in mod.named_parameters(recurse=False)]
        elif item == "norms":
            hits = sorted(norm_names, key=params.index)
        elif item == "biases":
            hits = [n for n in params if n.endswith(".bias") and n not in norm_names]
        else:
            hits = [n for n in params if fnmatch.fnmatchcase(n, item)]
        hits = [n for n in hits if n in params]  # a tied alias (lm_head.weight) is its owner's name
        if not hits:
            raise ValueError(
                f"train item {item!r} names no parameter; use none, {', '.join(TRAIN_KEYWORDS)} or fnmatch "
                f"patterns on parameter names such as {params[:4]}")
        names += [n for n in hits if n not in names]
    return names


def _install_lora(model, step: SpecStep, seed: int) -> None:
    """LoRA adapters of ``step`` on ``model`` (in place), then its ``train`` parameters unfrozen."""
    from .lora import apply_lora

    opts = dict(step.options)
    targets = [p.strip() for p in opts.get("targets", "*").split("|")]
    apply_lora(model, int(opts["rank"]), targets=targets, alpha=opts.get("alpha"), seed=lora_seed(seed))
    params = dict(model.named_parameters())
    for name in _train_items(model, opts["train"]):
        params[name].requires_grad_(True)


def build_base(config, spec: str | CompressionSpec, *, seed: int = 0, base_weights=None):
    """The GPT ``spec`` describes before any subspace wrapping, built from ``seed`` (see the module
    docstring): a :class:`~tokenbounds.models.gpt.GPT`, its linears swapped for structured ones
    when the spec has a kron / monarch step, or wrapped with LoRA adapters (everything but the
    adapters and the ``train`` parameters frozen) for a lora / sublora spec.

    ``base_weights``: a pretrained base instead of the seeded init -- a
    :class:`tokenbounds.quant.QuantizedModel` of this architecture (before adapters), whose
    *decoded* values are loaded before the adapters are installed (so the decoder, which has the
    same message, rebuilds the same base; its coded size is counted by the message that carries
    it, :class:`tokenbounds.compress.CodedModel`). The seeds still fix the LoRA ``A`` init and
    the projector."""
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
    if base_weights is not None:
        try:
            base_weights.load_into(model)
        except ValueError as exc:
            raise ValueError(f"base_weights do not fit the architecture of spec {str(sp)!r}: {exc}") from None
    if sp.adapter is not None:
        try:
            _install_lora(model, sp.adapter, seed)
        except ValueError as exc:
            raise ValueError(f"spec {str(sp)!r}: {exc}") from None
    return model


def build_model(config, spec: str | CompressionSpec, *, seed: int = 0, base_weights=None):
    """:func:`build_base` (``base_weights``: a pretrained base, see there), wrapped in a
    :class:`~tokenbounds.compress.subspace.SubspaceModel` (projector seed :func:`subspace_seed`)
    for a spec with a subspace step."""
    from .lora import adapters
    from .subspace import SubspaceModel

    sp = parse_spec(spec)
    model = build_base(config, sp, seed=seed, base_weights=base_weights)
    if sp.subspace is not None:
        try:
            model = SubspaceModel(model, sp.subspace.get("d"), seed=subspace_seed(seed),
                                  projector=sp.subspace.get("projector", "kron"))
        except ValueError as exc:
            detail = ""
            if sp.adapter is not None:
                n_lora = sum(p.numel() for a in adapters(model).values() for p in a.adapter_parameters())
                n_all = sum(p.numel() for p in model.parameters() if p.requires_grad)
                detail = (f" ({n_lora:,} LoRA adapter values + {n_all - n_lora:,} of train="
                          f"{sp.adapter.get('train')}; a larger rank or train= set gives more)")
            raise ValueError(f"spec {str(sp)!r}: {exc}{detail}") from None
    return model
