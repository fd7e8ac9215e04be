"""The demo's simple quantizer: b-bit symmetric uniform grid per tensor, entropy-coded size.

Each parameter tensor W (tied weights counted once) is stored as integer levels
``q = round(W / scale) in [-(2^(b-1) - 1), 2^(b-1) - 1]`` with ``scale = max|W| / (2^(b-1) - 1)``
held as a float32, and decoded as ``W_hat = float32(q) * scale``. The levels (shifted to
``0 .. 2^b - 2``) are range-coded with their empirical distribution by
:func:`tokenbounds.bounds.coding.message_length_bits` (``mode="exact"``), either as one pooled
stream or one stream per tensor, whichever is shorter (1 flag bit says which). Side information:
32 bits per scale; the shapes are implied by the model config, which is counted at 8 bits per
character of its JSON. The grid is symmetric so that zero is the same level in every tensor and
the pooled histogram stays peaked.

The bound must hold for the model the code describes, so the demo evaluates the *dequantized*
model. Later replaced by :mod:`tokenbounds.quant` (incoherence processing, LDLQ, codebooks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class QuantizedTensor:
    name: str
    shape: tuple[int, ...]
    levels: np.ndarray  # int64, 0 .. 2^bits - 2 (zero is level 2^(bits-1) - 1)
    scale: np.float32
    bits: int

    def dequantize(self) -> np.ndarray:
        half = (1 << (self.bits - 1)) - 1
        q = (self.levels.astype(np.int64) - half).astype(np.float32)
        return (q * np.float32(self.scale)).reshape(self.shape)


def quantize_tensor(w: np.ndarray, bits: int = 8, name: str = "") -> QuantizedTensor:
    """Symmetric uniform ``bits``-bit quantization of one tensor (round to nearest)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    w = np.asarray(w, dtype=np.float32)
    half = (1 << (bits - 1)) - 1
    amax = float(np.abs(w).max()) if w.size else 0.0
    scale = np.float32(amax / half) if amax > 0 else np.float32(1.0)
    q = np.clip(np.rint(w / scale), -half, half).astype(np.int64)
    return QuantizedTensor(name, tuple(w.shape), (q + half).reshape(-1), scale, bits)


@dataclass
class QuantizedModel:
    tensors: list[QuantizedTensor]
    config: dict[str, Any]
    bits: int
    size: dict[str, Any] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return int(sum(t.levels.size for t in self.tensors))


def unique_parameters(model) -> list[tuple[str, Any]]:
    """(name, tensor) of every distinct parameter (a tied weight appears once)."""
    return [(n, p) for n, p in model.named_parameters()]


def quantize_model(model, bits: int = 8) -> QuantizedModel:
    """Quantize every distinct parameter of ``model`` and count the code length."""
    from dataclasses import asdict

    tensors = [
        quantize_tensor(p.detach().float().cpu().numpy(), bits, name) for name, p in unique_parameters(model)
    ]
    config = asdict(model.config) if hasattr(model.config, "__dataclass_fields__") else dict(model.config)
    qm = QuantizedModel(tensors, config, bits)
    qm.size = code_length(qm)
    return qm


def code_length(qm: QuantizedModel) -> dict[str, Any]:
    """Bits to describe ``qm`` (see the module docstring); ``total_bits`` is C."""
    from ..bounds.coding import message_length_bits

    num_levels = (1 << qm.bits) - 1
    pooled = message_length_bits(
        np.concatenate([t.levels for t in qm.tensors]), mode="exact", num_levels=num_levels,
        codebook_bits_per_entry=0,
    )
    per_tensor = [
        message_length_bits(t.levels, mode="exact", num_levels=num_levels, codebook_bits_per_entry=0)
        for t in qm.tensors
    ]
    per_tensor_bits = float(sum(m.total_bits for m in per_tensor))
    use_pooled = pooled.total_bits <= per_tensor_bits
    levels_bits = pooled.total_bits if use_pooled else per_tensor_bits
    scales_bits = 32.0 * len(qm.tensors)
    config_bits = 8.0 * len(json.dumps(qm.config, sort_keys=True, separators=(",", ":")))
    total = levels_bits + 1.0 + scales_bits + config_bits
    entropy_bits = pooled.entropy_bits if use_pooled else float(sum(m.entropy_bits for m in per_tensor))
    return {
        "total_bits": total,
        "levels_bits": levels_bits,
        "levels_entropy_bits": entropy_bits,
        "stream": "pooled" if use_pooled else "per-tensor",
        "stream_choice_bits": 1.0,
        "pooled_bits": pooled.total_bits,
        "per_tensor_bits": per_tensor_bits,
        "scales_bits": scales_bits,
        "config_bits": config_bits,
        "num_parameters": qm.num_parameters,
        "bits_per_parameter": total / max(1, qm.num_parameters),
        "grid_bits": qm.bits,
    }


def dequantize_into(model, qm: QuantizedModel):
    """Copy the dequantized weights of ``qm`` into ``model`` (in place); returns ``model``."""
    import torch

    params = dict(unique_parameters(model))
    if set(params) != {t.name for t in qm.tensors}:
        raise ValueError("quantized tensors do not match the model's parameters")
    with torch.no_grad():
        for t in qm.tensors:
            p = params[t.name]
            p.copy_(torch.from_numpy(t.dequantize()).to(p.dtype))
    return model
