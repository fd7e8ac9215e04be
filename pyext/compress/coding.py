"""Coded size of a compressed model, and the decoder that rebuilds exactly the evaluated model.

The message (everything a decoder needs, every bit counted in :attr:`CodedModel.coded_bits`):

* ``header``: the architecture (GPT config), the compression spec, the init seed and the subspace
  (d, projector, seed), as compact JSON at 8 bits per character (the demo pipeline's convention
  for architecture configs). The quantizer settings are in the coded tensors' own headers
  (``tokenbounds.quant`` counts them there); the format tag and redundant checks (D) travel in
  the payload uncounted, since the decoder knows or recomputes them.
* ``weights`` (a :class:`tokenbounds.quant.QuantizedModel`, when the model's parameters are
  coded): :func:`quantize_parameters` -- every ``nn.Linear`` with
  :func:`tokenbounds.quant.quantize_model` (proxy Hessian from calibration tokens), the
  embeddings with :func:`tokenbounds.quant.embedding.quantize_embeddings`, the 2-D factors of
  Kronecker / Monarch layers with :func:`tokenbounds.quant.quantize_weight` (proxy Hessians of
  the factors' inputs, :func:`factor_hessians`),
  the rest (LayerNorm, biases) as float16. All integer streams go through the range coder of
  :mod:`tokenbounds.bounds.coding`.
* ``coordinates`` (a :class:`tokenbounds.quant.QuantizedWeight`, for subspace models): z
  zero-padded to a [ceil(d / 256), 256] matrix (rows of :data:`Z_COLUMNS`; a wider matrix would
  make ``quantize_weight`` build a d x d identity Hessian), quantized with the same codebooks
  (a float16 scale per row, optional Hadamard incoherence) and range-coded.

* ``weights`` of a LoRA model (spec ``lora``; :func:`code_trainable`): only its *trainable*
  parameters -- the LoRA factors with ``quantize_weight`` and the proxy Hessians of their inputs
  (:meth:`tokenbounds.compress.LoRALinear.factor_inputs`), other trainable matrices (an embedding)
  with an identity Hessian, vectors as float16; the frozen base is the seeded init, rebuilt from
  ``init_seed``.

* ``base`` (a :class:`tokenbounds.quant.QuantizedModel`, only for a model trained on a
  *pretrained* base): the code of that base, loaded into the architecture before the adapters
  are installed / the subspace is built, its size counted in full (``base_bits``); the header then
  says ``"base": "coded"``.

For a model trained from its seeded init (``subspace``, ``sublora``, ``lora``), the frozen base
is rebuilt from ``init_seed``: it costs its seed. On a pretrained base the model must have been
trained on the *decoded* base (``base.dequantized_model``; :func:`code_subspace` and
:func:`code_trainable` rebuild the base as the decoder will and check every frozen value), so
the decoder rebuilds theta_0 exactly.

``CodedModel.build()`` (also after ``decode(encode())``) returns the model that is evaluated:
the rebuilt architecture carrying the decoded parameters, bit for bit those of
``CodedModel.model`` on the same torch build. LoRA adapters are merged into their base weights
and removed (:func:`tokenbounds.compress.remove_adapters`), so a lora / sublora model is evaluated
as the plain GPT ``W0 + (alpha / r) B A`` it describes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .kronecker import KroneckerLinear
from .lora import LoRALinear, adapters, remove_adapters
from .monarch import MonarchLinear
from .subspace import SubspaceModel

__all__ = ["FORMAT", "CodedModel", "code_parameters", "code_subspace", "code_trainable", "factor_hessians",
           "quantize_parameters", "quantize_trainable"]

FORMAT = "tokenbounds.compress/1"
Z_COLUMNS = 256
STRUCTURED = (KroneckerLinear, MonarchLinear)


def _header_bits(header: dict[str, Any]) -> float:
    return 8.0 * len(json.dumps(header, sort_keys=True, separators=(",", ":")))


def factor_hessians(model: nn.Module, calibration_tokens, *, types: tuple[type, ...] = STRUCTURED
                    ) -> dict[str, torch.Tensor]:
    """Proxy Hessians E[v v^T] of the factors of every layer of ``types`` (default Kronecker /
    Monarch; :class:`~tokenbounds.compress.LoRALinear` for adapters) (parameter name ->
    [cols, cols] float64), from the layers' inputs on ``calibration_tokens`` (a [B, T] LongTensor
    or an iterable of them): what LDLQ needs to round a factor so that the layer output moves
    least, with the other factor of the layer fixed (see ``factor_inputs``)."""
    from ..quant import HessianAccumulator

    acc: dict[str, HessianAccumulator] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, types):
            def hook(module, inputs, output, name=name):
                for p, v in module.factor_inputs(inputs[0]).items():
                    acc.setdefault(f"{name}.{p}", HessianAccumulator(v.shape[-1])).update(v)
            handles.append(mod.register_forward_hook(hook))
    batches = [calibration_tokens] if isinstance(calibration_tokens, torch.Tensor) else calibration_tokens
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch if batch.dim() == 2 else batch[None])
    finally:
        for h in handles:
            h.remove()
    return {n: a.hessian for n, a in acc.items()}


def quantize_parameters(
    model: nn.Module,
    calibration_tokens,
    *,
    bits: int = 4,
    codebook: str = "uniform",
    method: str = "ldlq",
    incoherence: bool = True,
    seed: int = 0,
):
    """Code every parameter of a (possibly structured) GPT; returns a QuantizedModel whose
    ``dequantized_model(model)`` carries exactly the decoded values.

    Linear layers and embeddings as in the demo pipeline (``quantize_model`` +
    ``quantize_embeddings`` + ``compact_unquantized``); the factors of every
    :class:`KroneckerLinear` / :class:`MonarchLinear` with ``quantize_weight`` and the proxy
    Hessians of :func:`factor_hessians` (factor i in module order gets Hadamard seed
    ``seed + 2000 + i``).
    """
    from ..quant import QuantizedModel, quantize_model, quantize_weight
    from ..quant.embedding import compact_unquantized, quantize_embeddings

    args = {"bits": bits, "method": method, "codebook": codebook, "incoherence": incoherence}
    qm = quantize_model(model, calibration_tokens, seed=seed, progress=False, **args)
    qm = quantize_embeddings(model, qm, seed=seed, **args)
    layers, unquantized = dict(qm.layers), dict(qm.unquantized)
    hessians = factor_hessians(model, calibration_tokens)
    factors = [f"{name}.{p}" for name, mod in model.named_modules() if isinstance(mod, STRUCTURED)
               for p, t in mod.named_parameters(recurse=False) if t.dim() == 2]
    if sorted(factors) != sorted(hessians):
        raise ValueError(f"calibration never ran these structured factors: {sorted(set(factors) - set(hessians))[:5]}")
    for i, (name, h) in enumerate(hessians.items()):
        w = unquantized.pop(name)
        layers[name] = quantize_weight(w.to(torch.float32), h, seed=seed + 2000 + i, **args)
    config = {**qm.config, "structured_factors": {"names": list(hessians), "hessian": "factor inputs"}}
    return compact_unquantized(QuantizedModel(layers=layers, unquantized=unquantized, tied=dict(qm.tied),
                                              config=config))


def quantize_trainable(
    model: nn.Module,
    calibration_tokens,
    *,
    bits: int = 4,
    codebook: str = "uniform",
    method: str = "ldlq",
    incoherence: bool = True,
    seed: int = 0,
):
    """Code exactly the trainable parameters (``requires_grad``) of a model whose other parameters
    the decoder rebuilds from a seed (a LoRA model on its seeded init); returns a QuantizedModel
    holding those tensors only (load it with :meth:`CodedModel.build`, not ``load_into``).

    LoRA factors with ``quantize_weight`` and the proxy Hessians of their inputs
    (:func:`factor_hessians` with ``types=(LoRALinear,)``), any other trainable matrix (e.g. an
    embedding, which is also the tied LM head) with an identity Hessian, vectors as float16;
    trainable tensor i in parameter order gets Hadamard seed ``seed + i``. A tall matrix (more rows
    than columns: LoRA's ``B`` [out, r], an embedding [V, d]) is coded as its transpose with an
    identity Hessian (:func:`_coded_transposed`): ``quantize_weight`` pays a float16 scale per
    row, 16 bits per r values of ``B`` otherwise; the decoder applies the same rule to the shapes
    it rebuilds, so this costs no bits.
    """
    from ..quant import QuantizedModel, quantize_weight
    from ..quant.embedding import compact_unquantized

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (requires_grad=True) to code")
    hessians = factor_hessians(model, calibration_tokens, types=(LoRALinear,)) if adapters(model) else {}
    layers, unquantized = {}, {}
    for i, (name, p) in enumerate(trainable):
        if p.dim() == 2:
            w = p.detach().to("cpu", torch.float32)
            flip = _coded_transposed(w.shape)
            layers[name] = quantize_weight(w.t().contiguous() if flip else w, None if flip else hessians.get(name),
                                           bits=bits, codebook=codebook, method=method, incoherence=incoherence,
                                           seed=seed + i)
        else:
            unquantized[name] = p.detach().cpu().clone()
    config = {"bits": bits, "method": method, "codebook": codebook, "incoherence": incoherence, "seed": seed,
              "coded": "trainable parameters"}
    return compact_unquantized(QuantizedModel(layers=layers, unquantized=unquantized, config=config))


def _coded_transposed(shape) -> bool:
    """Whether :func:`quantize_trainable` codes a matrix of ``shape`` as its transpose (tall)."""
    return len(shape) == 2 and shape[0] > shape[1]


def _load_trainable(net: nn.Module, weights) -> None:
    """Overwrite the trainable parameters of ``net`` with a :func:`quantize_trainable` message."""
    decoded = weights.dequantized_state_dict()
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    if set(decoded) != set(params):
        raise ValueError(f"the message codes {sorted(decoded)[:5]}..., the rebuilt model trains "
                         f"{sorted(params)[:5]}...: not a message for this architecture")
    with torch.no_grad():
        for name, p in params.items():
            value = decoded[name].t() if _coded_transposed(p.shape) else decoded[name]
            if value.shape != p.shape:
                raise ValueError(f"the message codes {name!r} with shape {tuple(value.shape)}, the rebuilt "
                                 f"model has {tuple(p.shape)}: not a message for this architecture")
            p.copy_(value.to(p.dtype))


def _evaluable(net: nn.Module) -> nn.Module:
    """The model to evaluate: LoRA adapters merged into their base weights and removed (a plain
    GPT), eval mode."""
    if adapters(net):
        remove_adapters(net, merge=True)
    return net.eval()


@dataclass
class CodedModel:
    """A compressed model's complete message (see the module docstring) and its decoder."""

    header: dict[str, Any]  # counted: arch, spec, init_seed, subspace, base
    weights: Any = None  # tokenbounds.quant.QuantizedModel | None
    base: Any = None  # tokenbounds.quant.QuantizedModel of a pretrained base | None
    coordinates: Any = None  # tokenbounds.quant.QuantizedWeight | None (z padded to [rows, Z_COLUMNS])
    checks: dict[str, Any] = field(default_factory=dict)  # uncounted, recomputable (D)
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the evaluated model

    @property
    def coded_bits_detail(self) -> dict[str, float]:
        return {
            "header_bits": _header_bits(self.header),
            "base_bits": float(self.base.coded_bits) if self.base is not None else 0.0,
            "weights_bits": float(self.weights.coded_bits) if self.weights is not None else 0.0,
            "coordinates_bits": float(self.coordinates.coded_bits) if self.coordinates is not None else 0.0,
        }

    @property
    def coded_bits(self) -> float:
        """Bits of the whole message (the tokenizer is not included: the caller adds it)."""
        return float(sum(self.coded_bits_detail.values()))

    def z(self) -> torch.Tensor | None:
        """The decoded subspace coordinates [d] (None for a model without subspace)."""
        if self.coordinates is None:
            return None
        return self.coordinates.dequantize().reshape(-1)[: int(self.header["subspace"]["d"])]

    def build(self, base: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
        """Decode: the model this message describes, in eval mode.

        ``base``: the architecture with theta_0 (a module or a callable returning one) for a
        message whose header does not describe a GPT; by default it is rebuilt from the header
        (:func:`tokenbounds.compress.spec.build_base`).
        """
        from ..models.gpt import GPTConfig
        from .spec import build_base, parse_spec, pretrained_base

        h = self.header
        disagree = ValueError("the header and the message disagree on whether a coded pretrained base is present")
        if (h.get("base") == "coded") != (self.base is not None):
            raise disagree
        if base is None:
            if "gpt" not in h.get("arch", {}):
                raise ValueError("the header does not describe a GPT; pass base= (the architecture with theta_0)")
            if pretrained_base(h["spec"]) is not None and self.base is None:
                raise disagree
            net = build_base(GPTConfig(**h["arch"]["gpt"]), h["spec"], seed=int(h["init_seed"]),
                             base_weights=self.base)
        else:
            net = base() if callable(base) and not isinstance(base, nn.Module) else base
            if self.base is not None:
                self.base.load_into(net)
        sub = h.get("subspace")
        if self.weights is not None:
            if sub is None and parse_spec(h["spec"]).adapter is not None:
                _load_trainable(net, self.weights)  # a LoRA message codes the trained tensors only
            else:
                self.weights.load_into(net)
        if sub is not None:
            wrapper = SubspaceModel(net, int(sub["d"]), seed=int(sub["seed"]), projector=sub["projector"])
            if "D" in self.checks and wrapper.num_parameters != int(self.checks["D"]):
                raise ValueError(f"the rebuilt base has {wrapper.num_parameters} trainable parameters, the "
                                 f"message was made for D={self.checks['D']}")
            net = wrapper.materialize(self.z())
        return _evaluable(net)

    def encode(self) -> dict[str, Any]:
        """The message as plain data (range-coded streams, float16 arrays, the JSON header)."""
        return {"format": FORMAT, "header": json.loads(json.dumps(self.header)), "checks": dict(self.checks),
                "weights": None if self.weights is None else self.weights.encode(),
                "base": None if self.base is None else self.base.encode(),
                "coordinates": None if self.coordinates is None else self.coordinates.encode()}

    @classmethod
    def decode(cls, payload: dict[str, Any]) -> CodedModel:
        """Inverse of :meth:`encode` (call :meth:`build` for the model)."""
        from ..quant import QuantizedModel, QuantizedWeight

        if payload.get("format") != FORMAT:
            raise ValueError(f"not a tokenbounds.compress message (format={payload.get('format')!r})")
        w, c, b = payload.get("weights"), payload.get("coordinates"), payload.get("base")
        return cls(header=dict(payload["header"]), checks=dict(payload.get("checks", {})),
                   weights=None if w is None else QuantizedModel.decode(w),
                   base=None if b is None else QuantizedModel.decode(b),
                   coordinates=None if c is None else QuantizedWeight.decode(c))

    def summary(self) -> dict[str, Any]:
        out = {"coded_bits": self.coded_bits, **self.coded_bits_detail, "spec": self.header.get("spec")}
        if self.coordinates is not None:
            out["coordinate_bits_per_dim"] = self.coded_bits_detail["coordinates_bits"] / int(self.header["subspace"]["d"])
        return out


def _gpt_arch(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("the model has no GPT config; pass arch= (a JSON-able description of the base)")
    return {"gpt": asdict(cfg)}


def code_parameters(
    model: nn.Module,
    calibration_tokens,
    *,
    spec: str,
    init_seed: int,
    bits: int = 4,
    codebook: str = "uniform",
    method: str = "ldlq",
    incoherence: bool = True,
    quant_seed: int = 0,
    arch: dict[str, Any] | None = None,
) -> CodedModel:
    """Code a trained (dense, Kronecker or Monarch) GPT by quantizing all its parameters
    (:func:`quantize_parameters`); ``CodedModel.model`` is the dequantized model to evaluate.

    ``init_seed`` is only used to rebuild the architecture (its init values are overwritten)."""
    qm = quantize_parameters(model, calibration_tokens, bits=bits, codebook=codebook, method=method,
                             incoherence=incoherence, seed=quant_seed)
    header = {"arch": arch if arch is not None else _gpt_arch(model), "spec": str(spec), "init_seed": int(init_seed)}
    return CodedModel(header=header, weights=qm, model=qm.dequantized_model(model).eval())


def _check_rebuilds(module: nn.Module, spec: str, init_seed: int, base_weights, *, frozen_only: bool) -> None:
    """Rebuild ``spec``'s base as the decoder will (:func:`~tokenbounds.compress.spec.build_base`
    from ``init_seed`` and ``base_weights``) and check that every parameter of ``module`` the
    message does not code (the frozen ones, or all of them for the theta_0 of a subspace) has
    exactly the rebuilt value."""
    from .spec import build_base

    rebuilt = dict(build_base(module.config, spec, seed=init_seed, base_weights=base_weights).named_parameters())
    where = "the decoded base_weights" if base_weights is not None else f"the seeded init at seed {init_seed}"
    for name, p in module.named_parameters():
        if frozen_only and p.requires_grad:
            continue
        if name not in rebuilt or not torch.equal(rebuilt[name].detach(), p.detach()):
            raise ValueError(
                f"theta_0 of {name!r} differs from {where} (spec {spec!r}): the decoder could not rebuild it; "
                "build the model with tokenbounds.compress.build_model(config, spec, seed=init_seed, "
                "base_weights=...) and train that")


def code_trainable(
    model: nn.Module,
    calibration_tokens,
    *,
    spec: str,
    init_seed: int,
    bits: int = 4,
    codebook: str = "uniform",
    method: str = "ldlq",
    incoherence: bool = True,
    quant_seed: int = 0,
    base_weights=None,
) -> CodedModel:
    """Code a trained LoRA GPT (spec ``lora:...``) by its trainable parameters only
    (:func:`quantize_trainable`); the frozen base is rebuilt by the decoder from ``init_seed``
    (a seeded init: costs the seed) or from ``base_weights`` (the QuantizedModel of a pretrained
    base, carried in the message and counted), so ``CodedModel.model`` is the decoder's own
    output (adapters merged)."""
    from .spec import parse_spec

    sp = parse_spec(spec)
    if sp.adapter is None or sp.subspace is not None:
        raise ValueError(f"code_trainable codes 'lora:...' specs, got {spec!r}")
    _check_rebuilds(model, str(sp), init_seed, base_weights, frozen_only=True)
    qm = quantize_trainable(model, calibration_tokens, bits=bits, codebook=codebook, method=method,
                            incoherence=incoherence, seed=quant_seed)
    header = {"arch": _gpt_arch(model), "spec": str(sp), "init_seed": int(init_seed)}
    if base_weights is not None:
        header["base"] = "coded"
    code = CodedModel(header=header, weights=qm, base=base_weights)
    code.model = code.build()
    return code


def code_subspace(
    sub: SubspaceModel,
    *,
    spec: str,
    init_seed: int,
    bits: int = 4,
    codebook: str = "uniform",
    method: str = "rtn",
    incoherence: bool = True,
    quant_seed: int = 0,
    base_weights=None,
    arch: dict[str, Any] | None = None,
) -> CodedModel:
    """Code a trained :class:`SubspaceModel`: its coordinates z quantized and range-coded, the
    projector by its seed, theta_0 by ``init_seed`` (a seeded init) or by ``base_weights`` (the
    QuantizedModel of a pretrained base, whose decoded values must be theta_0 exactly; carried in
    the message and counted).

    For a GPT (``arch`` None) the base is rebuilt as the decoder will and every value of theta_0
    checked; with a custom ``arch`` (decoded with ``build(base=...)``) only the subspace
    parameters present in ``base_weights`` are.
    ``CodedModel.model`` is ``sub.materialize(decoded z)``: the model to evaluate.
    """
    from ..quant import quantize_weight

    if not isinstance(sub, SubspaceModel):
        raise TypeError(f"sub must be a SubspaceModel, got {type(sub).__name__}")
    if arch is None:
        _check_rebuilds(sub.module, str(spec), init_seed, base_weights, frozen_only=False)
    elif base_weights is not None:
        decoded = base_weights.dequantized_state_dict()
        params = dict(sub.module.named_parameters())
        for name in sub.names:
            if name in decoded and not torch.equal(decoded[name].to(params[name].dtype), params[name].detach()):
                raise ValueError(
                    f"theta_0 of {name!r} differs from the decoded base: train the subspace on "
                    "base_weights.dequantized_model(...) so that the decoder can rebuild theta_0"
                )
    cols = min(Z_COLUMNS, sub.dim)
    z = torch.zeros(-(-sub.dim // cols) * cols, dtype=torch.float32)
    z[: sub.dim] = sub.z.detach().to("cpu", torch.float32)
    coords = quantize_weight(z.view(-1, cols), None, bits=bits, codebook=codebook, method=method, incoherence=incoherence,
                             seed=quant_seed)
    header = {"arch": arch if arch is not None else _gpt_arch(sub.module), "spec": str(spec),
              "init_seed": int(init_seed), "subspace": {"d": sub.dim, "projector": sub.projector.kind, "seed": sub.seed}}
    if base_weights is not None:
        header["base"] = "coded"
    code = CodedModel(header=header, base=base_weights, coordinates=coords, checks={"D": sub.num_parameters})
    code.model = _evaluable(sub.materialize(code.z()))
    return code
