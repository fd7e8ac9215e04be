"""QuIP-style quantization with an exact coded size (issue 4).

* :func:`quantize_weight` -> :class:`QuantizedWeight`: one matrix, incoherence processing
  (randomized Hadamard), LDLQ or RTN, uniform or E8 lattice codebook, ``proxy_loss``,
  ``coded_bits`` (range-coded codes + side information), ``dequantize()``.
* :func:`quantize_model` -> :class:`QuantizedModel`: every nn.Linear of a model, Hessians from
  forward hooks, ``coded_bits``, ``encode()``/``decode()`` round trip, ``dequantized_model()``.
* :func:`quantize_model_to_tbq` -> :class:`TBQ`: a real model (our GPT, a Hugging Face causal LM)
  quantized layer by layer with calibration Hessians into a ``.tbq`` file (its size in bits is
  the complexity C), resumable; :func:`load_tbq` reads and verifies one, :func:`apply_tbq`
  writes the decoded weights into a model of the same architecture and returns C's parts
  (``tokenbounds quantize`` on the command line).
* Hadamard matrices of order K * 2^k: :mod:`tokenbounds.quant.hadamard_matrices`.

Names are imported lazily so that ``import tokenbounds.quant.hadamard_matrices`` stays light.
"""

from __future__ import annotations

from .hadamard_matrices import hadamard_matrix, is_supported_size, next_supported_size

_LAZY = {
    "QuantizedWeight": "weight",
    "quantize_weight": "weight",
    "proxy_loss": "weight",
    "QuantizedModel": "model",
    "quantize_model": "model",
    "collect_hessians": "model",
    "HessianAccumulator": "model",
    "e8_nearest": "codebooks",
    "TBQ": "tbq",
    "TBQError": "tbq",
    "load_tbq": "tbq",
    "parse_tbq": "tbq",
    "apply_tbq": "tbq",
    "architecture_of": "tbq",
    "quantize_model_to_tbq": "layerwise",
    "calibration_windows": "layerwise",
    "QuantizeRunMismatch": "layerwise",
}

__all__ = ["hadamard_matrix", "is_supported_size", "next_supported_size", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'tokenbounds.quant' has no attribute {name!r}")
