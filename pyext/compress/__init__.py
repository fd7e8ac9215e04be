"""Parameter-efficient reparametrisations of a model's linear layers (adapters).

An *adapter* wraps one ``nn.Linear`` and adds a trainable update ``Delta W`` to its frozen weight
``W``: ``y = x (W + Delta W)^T + b``. Every adapter of this package subclasses
:class:`~tokenbounds.compress.lora.LinearAdapter` (``delta_weight()``, ``merge()``,
``unmerge()``) and is installed with :func:`~tokenbounds.compress.lora.wrap_linears`, which
replaces the linear layers whose names match a pattern and freezes everything else, so the
trained parameters (the ones a prequential code or a compression bound pays for) are exactly
:func:`~tokenbounds.compress.lora.trainable_parameters`.

* :mod:`.lora`: LoRA, ``Delta W = (alpha / r) B A`` with ``A`` [r, in], ``B`` [out, r]
  (Hu et al. 2021, arXiv 2106.09685); ``B = 0`` at initialisation, so the wrapped model starts
  as the base model.
"""

from __future__ import annotations

from .lora import (
    LinearAdapter,
    LoRALinear,
    adapters,
    apply_lora,
    merge_adapters,
    remove_adapters,
    trainable_parameters,
    unmerge_adapters,
    wrap_linears,
)

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
