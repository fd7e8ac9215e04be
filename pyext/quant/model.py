"""quantize_model: every nn.Linear of a torch model -> QuantizedModel with an exact coded size.

Proxy Hessians H = E[x x^T] of each linear layer's input are accumulated by forward hooks over
the calibration batches (float64 sums and a token count, streaming), once per distinct input
tensor: layers that read the same tensor (q/k/v projections of Hugging Face models) share one H.
All Hessians come from the full-precision model (as in QuIP#). Every other tensor (embeddings
not tied to a linear layer, biases, norms) is kept at its stored precision and counted at
``8 * element_size`` bits per entry.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .weight import QuantizedWeight, quantize_weight

ENTRY_BITS = 32  # per tensor in the model header (which tensors are quantized, flags)


class HessianAccumulator:
    """Streaming E[x x^T] over the rows of x [..., d] (float64 sums + count)."""

    def __init__(self, d: int):
        self.sum = torch.zeros((d, d), dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        self.sum.addmm_(x2.t(), x2)
        self.count += x2.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.sum / max(1, self.count)


def _batches(calibration_tokens) -> Iterable[torch.Tensor]:
    if isinstance(calibration_tokens, torch.Tensor):
        if calibration_tokens.dim() == 1:
            calibration_tokens = calibration_tokens[None]
        return [calibration_tokens]
    return calibration_tokens


def collect_hessians(model: nn.Module, calibration_tokens, *, layers: dict[str, nn.Linear] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Proxy Hessians of every nn.Linear input: (name -> H, name -> name of the layer owning it).

    ``calibration_tokens``: a LongTensor [B, T] or an iterable of them; ``model(batch)`` is run
    under ``torch.no_grad``.
    """
    if layers is None:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    acc: dict[str, HessianAccumulator] = {}
    owner: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    alive: list[torch.Tensor] = []  # inputs seen in this batch: their memory must not be reused
    handles = []

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0]
            if name not in owner:  # first batch: share H between layers reading the same tensor
                # (a freed input's address can come back for another layer's input, so keep them alive)
                alive.append(x)
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
                owner[name] = seen.setdefault(key, name)
                if owner[name] == name:
                    acc[name] = HessianAccumulator(x.shape[-1])
            if owner[name] == name:
                acc[name].update(x)
        return fn

    for name, mod in layers.items():
        handles.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for batch in _batches(calibration_tokens):
                seen.clear()
                model(batch)
                alive.clear()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in owner]
    if missing:
        raise ValueError(f"calibration never ran these linear layers (no Hessian): {missing[:5]}")
    return {n: acc[owner[n]].hessian for n in layers}, owner


def _dtype_bits(t: torch.Tensor) -> int:
    return 8 * t.element_size()


@dataclass
class QuantizedModel:
    """Quantized linear weights + the tensors kept as they are; decodes to a full state dict."""

    layers: dict[str, QuantizedWeight]  # parameter name (e.g. "blocks.0.mlp.0.weight") -> codes
    unquantized: dict[str, torch.Tensor]
    tied: dict[str, str] = field(default_factory=dict)  # state-dict alias -> stored name
    config: dict[str, Any] = field(default_factory=dict)
    transposed: set[str] = field(default_factory=set)  # layers stored as W^T (GPT-2 Conv1D weights [in, out])

    @property
    def proxy_losses(self) -> dict[str, float]:
        return {n: q.proxy_loss for n, q in self.layers.items()}

    @property
    def coded_bits_detail(self) -> dict[str, float]:
        return {
            "quantized_bits": float(sum(q.coded_bits for q in self.layers.values())),
            "unquantized_bits": float(sum(t.numel() * _dtype_bits(t) for t in self.unquantized.values())),
            "header_bits": float(ENTRY_BITS * (len(self.layers) + len(self.unquantized) + len(self.tied))),
        }

    @property
    def coded_bits(self) -> float:
        """Total description length: entropy-coded codes + every side information + kept tensors."""
        return float(sum(self.coded_bits_detail.values()))

    @property
    def num_quantized_weights(self) -> int:
        return sum(q.num_weights for q in self.layers.values())

    def dequantized_state_dict(self) -> dict[str, torch.Tensor]:
        out = {n: q.dequantize() for n, q in self.layers.items()}
        for n in getattr(self, "transposed", ()):  # absent in QuantizedModels pickled before it existed
            out[n] = out[n].t().contiguous()
        out.update({n: t.clone() for n, t in self.unquantized.items()})
        for alias, name in self.tied.items():
            out[alias] = out[name]
        return out

    def load_into(self, model: nn.Module) -> nn.Module:
        """Overwrite ``model``'s parameters in place with the decoded ones."""
        sd = self.dequantized_state_dict()
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if m not in self.tied]
        if missing or unexpected:
            raise ValueError(f"model does not match the quantized state (missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model

    def dequantized_model(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` carrying the decoded weights (the original is untouched)."""
        return self.load_into(copy.deepcopy(model))

    def encode(self) -> dict[str, Any]:
        """The full message: per-layer range-coded streams + side info, kept tensors as arrays."""
        return {
            "layers": {n: q.encode() for n, q in self.layers.items()},
            "unquantized": {n: (str(t.dtype).removeprefix("torch."), t.detach().cpu().view(-1).clone())
                            for n, t in self.unquantized.items()},
            "shapes": {n: tuple(t.shape) for n, t in self.unquantized.items()},
            "tied": dict(self.tied),
            "config": dict(self.config),
            "transposed": sorted(getattr(self, "transposed", ())),
        }

    @classmethod
    def decode(cls, payload: dict[str, Any]) -> QuantizedModel:
        layers = {n: QuantizedWeight.decode(p) for n, p in payload["layers"].items()}
        unq = {n: flat.reshape(payload["shapes"][n]).clone() for n, (_, flat) in payload["unquantized"].items()}
        return cls(layers=layers, unquantized=unq, tied=dict(payload["tied"]), config=dict(payload["config"]),
                   transposed=set(payload.get("transposed", ())))

    def summary(self) -> dict[str, Any]:
        n = self.num_quantized_weights
        return {
            "coded_bits": self.coded_bits,
            **self.coded_bits_detail,
            "quantized_weights": n,
            "bits_per_quantized_weight": self.coded_bits_detail["quantized_bits"] / max(1, n),
            "mean_proxy_loss": float(np.mean(list(self.proxy_losses.values()))) if self.layers else 0.0,
        }


def quantize_model(
    model: nn.Module,
    calibration_tokens,
    *,
    bits: int = 4,
    method: str = "ldlq",
    codebook: str = "uniform",
    incoherence: bool = True,
    seed: int = 0,
    group_size: int | None = None,
    damp: float = 0.01,
    skip: Iterable[str] = (),
    progress: bool = True,
) -> QuantizedModel:
    """Quantize every nn.Linear weight of ``model`` (see :func:`tokenbounds.quant.quantize_weight`).

    Works for any model whose forward takes a token batch (our GPT, Hugging Face causal LMs).
    A linear weight tied to another parameter (e.g. the LM head and the token embedding) is coded
    once. Layers whose module name is in ``skip`` stay at their stored precision. Layer i uses
    seed ``seed + i`` for its Hadamard signs.
    """
    from tqdm.auto import tqdm

    skip = set(skip)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip}
    hessians, _ = collect_hessians(model, calibration_tokens, layers=linears)
    # parameter name of each tensor, with aliases for tied parameters
    names_by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(p), []).append(name)
    layers: dict[str, QuantizedWeight] = {}
    tied: dict[str, str] = {}
    done: set[int] = set()
    items = list(linears.items())
    for i, (name, mod) in enumerate(tqdm(items, desc="quantize", disable=not progress)):
        pid = id(mod.weight)
        pname = f"{name}.weight" if name else "weight"
        if pid in done:
            continue
        done.add(pid)
        layers[pname] = quantize_weight(
            mod.weight.detach(), hessians[name], bits=bits, codebook=codebook, method=method,
            incoherence=incoherence, seed=seed + i, group_size=group_size, damp=damp,
        )
        for alias in names_by_id.get(pid, []):
            if alias != pname:
                tied[alias] = pname
    unquantized: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        if name in layers or name in tied:
            continue
        unquantized[name] = t.detach().cpu().clone()
    cfg = dict(bits=bits, method=method, codebook=codebook, incoherence=incoherence, seed=seed,
               group_size=group_size, damp=damp)
    return QuantizedModel(layers=layers, unquantized=unquantized, tied=tied, config=cfg)
