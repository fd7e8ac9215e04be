"""Quantize what :func:`tokenbounds.quant.quantize_model` keeps at full precision.

``quantize_model`` codes every ``nn.Linear`` weight (a token embedding tied to the LM head is
coded once, through the head) and stores every other tensor at its stored precision (32 bits per
float32 entry). In models of 10^4 - 10^5 parameters those kept tensors are a large share of the
code: a position embedding of 64 x 32 float32 entries alone is 65,536 bits. Two helpers:

* :func:`quantize_embeddings` codes the weight of every ``nn.Embedding`` that is not already
  coded with :func:`tokenbounds.quant.quantize_weight`. An embedding is a linear map applied to
  one-hot inputs, so its proxy Hessian E[x x^T] is diagonal (the row frequencies); we use the
  identity instead (every row matters equally: plain weight MSE), with the weight viewed as
  [rows, dim] so each row (token / position) gets its own scale. With ``recode_tied=True`` it
  also recodes a linear weight tied to an embedding (the LM head of a tied GPT) with the
  identity Hessian: ``quantize_model`` codes it with the head's proxy Hessian E[h h^T] (final
  hidden states), and LDLQ's error feedback then pushes the rounding error into directions the
  head ignores but the token embedding uses. Measured on the demo's models (V = 512, d = 48/64,
  4 bits, 2000 sampled tokens): LDLQ on the tied head costs 0.16 - 0.28 bits/token of loss that
  an identity-Hessian head avoids.
* :func:`compact_unquantized` stores the remaining floating-point tensors (LayerNorm gains and
  biases, linear biases) as float16 (16 bits per entry instead of 32).

Both return a new :class:`~tokenbounds.quant.model.QuantizedModel` whose ``coded_bits`` counts the
new representation and whose ``dequantized_model`` carries exactly the decoded values, so a bound
computed on the dequantized model is a bound on the model the code describes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from .model import QuantizedModel
from .weight import quantize_weight

__all__ = ["compact_unquantized", "quantize_embeddings"]


def quantize_embeddings(
    model: nn.Module,
    qm: QuantizedModel,
    *,
    bits: int = 4,
    codebook: str = "uniform",
    method: str = "rtn",
    incoherence: bool = True,
    seed: int = 0,
    skip: Iterable[str] = (),
    recode_tied: bool = True,
) -> QuantizedModel:
    """Code every ``nn.Embedding`` weight of ``model`` that ``qm`` still keeps unquantized.

    Args:
        model: the full-precision model ``qm`` was made from.
        qm: the result of :func:`tokenbounds.quant.quantize_model` on ``model``.
        bits, codebook, method, incoherence: as in :func:`tokenbounds.quant.quantize_weight`
            (identity Hessian, so "ldlq" reduces to error feedback on plain MSE).
        seed: embedding i (in module order) uses seed ``seed + 1000 + i`` for its Hadamard signs.
        skip: module names to leave as they are.
        recode_tied: also recode, with the identity Hessian, every coded linear weight that is
            tied to an embedding (keeping its Hadamard seed).

    Returns:
        A new QuantizedModel (``qm`` is not modified).
    """
    if not isinstance(qm, QuantizedModel):
        raise TypeError(f"qm must be a tokenbounds.quant QuantizedModel, got {type(qm).__name__}")
    skip = set(skip)
    layers = dict(qm.layers)
    unquantized = dict(qm.unquantized)
    done = []
    for i, (name, mod) in enumerate(m for m in model.named_modules() if isinstance(m[1], nn.Embedding)):
        pname = f"{name}.weight"
        if name in skip or pname not in unquantized:
            continue  # tied to a coded linear weight, or skipped
        w = mod.weight.detach().to("cpu", torch.float32)
        layers[pname] = quantize_weight(w, None, bits=bits, codebook=codebook, method=method,
                                        incoherence=incoherence, seed=seed + 1000 + i)
        del unquantized[pname]
        done.append(pname)
    recoded = []
    if recode_tied:
        embeddings = {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, nn.Embedding)}
        params = dict(model.named_parameters(remove_duplicate=False))
        for alias, stored in qm.tied.items():
            if alias in embeddings and stored in layers and alias.removesuffix(".weight") not in skip:
                w = params[stored].detach().to("cpu", torch.float32)
                layers[stored] = quantize_weight(w, None, bits=bits, codebook=codebook, method=method,
                                                 incoherence=incoherence, seed=layers[stored].seed)
                recoded.append(stored)
    config = {**qm.config, "embeddings": {"names": done, "bits": bits, "codebook": codebook,
                                          "method": method, "incoherence": incoherence,
                                          "hessian": "identity", "recoded_tied": recoded}}
    return QuantizedModel(layers=layers, unquantized=unquantized, tied=dict(qm.tied), config=config,
                          transposed=set(getattr(qm, "transposed", ())))


def compact_unquantized(qm: QuantizedModel, dtype: torch.dtype = torch.float16) -> QuantizedModel:
    """Store every floating-point tensor ``qm`` keeps unquantized in ``dtype`` (default float16).

    Raises ValueError when a value would overflow ``dtype`` (the decoded model would differ
    arbitrarily from the original).
    """
    if not isinstance(qm, QuantizedModel):
        raise TypeError(f"qm must be a tokenbounds.quant QuantizedModel, got {type(qm).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch dtype, got {dtype}")
    out = {}
    for name, t in qm.unquantized.items():
        if t.is_floating_point() and t.element_size() > torch.finfo(dtype).bits // 8:
            c = t.to(dtype)
            if not bool(torch.isfinite(c).all()) and bool(torch.isfinite(t).all()):
                raise ValueError(f"tensor {name!r} overflows {dtype}; keep it at {t.dtype}")
            out[name] = c
        else:
            out[name] = t
    config = {**qm.config, "unquantized_dtype": str(dtype).removeprefix("torch.")}
    return QuantizedModel(layers=dict(qm.layers), unquantized=out, tied=dict(qm.tied), config=config,
                          transposed=set(getattr(qm, "transposed", ())))
