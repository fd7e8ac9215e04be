"""Compression by parametrization (issue 15; Lotfi et al. 2023, arXiv 2312.17173; 2024, arXiv
2407.18158): adapters, Kronecker-factored and Monarch linear layers, subspace training (SubLoRA's
seeded projector), their coded size and decoder, and the train-and-code entry point of the demo.

* :mod:`.lora`: LoRA, ``Delta W = (alpha / r) B A`` with ``A`` [r, in], ``B`` [out, r]
  (Hu et al. 2021, arXiv 2106.09685); ``B = 0`` at initialisation, so the wrapped model starts
  as the base model. Every adapter subclasses :class:`LinearAdapter` (``delta_weight()``,
  ``merge()``, ``unmerge()``) and is installed with :func:`wrap_linears`, which replaces the
  linear layers whose names match a pattern and freezes everything else, so the trained
  parameters (the ones a prequential code or a compression bound pays for) are exactly
  :func:`trainable_parameters`.
* :class:`KroneckerLinear`, :class:`MonarchLinear`: drop-ins for ``nn.Linear``;
  :func:`replace_linears` swaps them into a built model by name pattern.
* :class:`SubspaceModel`: ``theta = theta_0 + P z`` over any set of trainable parameters (with
  LoRA adapters installed first: SubLoRA), with a seeded :class:`KroneckerProjector` (never
  forms P).
* :class:`CodedModel`, :func:`code_parameters`, :func:`code_subspace`, :func:`code_trainable`,
  :func:`quantize_parameters`, :func:`quantize_trainable`: the coded message (codebooks + range coder of
  :mod:`tokenbounds.quant` / :mod:`tokenbounds.bounds.coding`) and its exact decoder.
* :func:`parse_spec`, :func:`build_model`, :func:`compress_candidate`: spec strings such as
  ``"subspace:d=2000"``, ``"kron:rank=2"``, ``"monarch:blocks=4"``, ``"lora:rank=4"``,
  ``"sublora:rank=4,d=2000"`` (LoRA / SubLoRA on the seeded init: :mod:`.spec`).
"""

from __future__ import annotations

from .coding import (
    CodedModel,
    code_parameters,
    code_subspace,
    code_trainable,
    factor_hessians,
    quantize_parameters,
    quantize_trainable,
)
from .experiment import (
    Candidate,
    TrainedCandidate,
    calibration_batch,
    code_candidate,
    compress_candidate,
    evaluate_loss,
    train_candidate,
)
from .kronecker import KroneckerLinear, factor_pair
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
from .monarch import MonarchLinear
from .spec import (
    CompressionSpec,
    build_base,
    build_model,
    parse_spec,
    pretrained_base,
    split_specs,
    subspace_lr,
)
from .subspace import DenseProjector, KroneckerProjector, SubspaceModel, make_projector
from .swap import replace_linears, structured_layer

__all__ = [
    "Candidate",
    "CodedModel",
    "CompressionSpec",
    "DenseProjector",
    "KroneckerLinear",
    "KroneckerProjector",
    "LinearAdapter",
    "LoRALinear",
    "MonarchLinear",
    "SubspaceModel",
    "TrainedCandidate",
    "adapters",
    "apply_lora",
    "build_base",
    "build_model",
    "calibration_batch",
    "code_candidate",
    "code_parameters",
    "code_subspace",
    "code_trainable",
    "compress_candidate",
    "evaluate_loss",
    "factor_hessians",
    "factor_pair",
    "make_projector",
    "merge_adapters",
    "parse_spec",
    "pretrained_base",
    "split_specs",
    "quantize_parameters",
    "quantize_trainable",
    "remove_adapters",
    "replace_linears",
    "structured_layer",
    "subspace_lr",
    "train_candidate",
    "trainable_parameters",
    "unmerge_adapters",
    "wrap_linears",
]
