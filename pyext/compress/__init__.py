"""Compression by parametrization (issue 15; Lotfi et al. 2023, arXiv 2312.17173; 2024, arXiv
2407.18158): Kronecker-factored and Monarch linear layers, subspace training (SubLoRA's seeded
projector), their coded size and decoder, and the train-and-code entry point of the demo.

* :class:`KroneckerLinear`, :class:`MonarchLinear`: drop-ins for ``nn.Linear``;
  :func:`replace_linears` swaps them into a built model by name pattern.
* :class:`SubspaceModel`: ``theta = theta_0 + P z`` over any set of trainable parameters, with a
  seeded :class:`KroneckerProjector` (never forms P).
* :class:`CodedModel`, :func:`code_parameters`, :func:`code_subspace`,
  :func:`quantize_parameters`: the coded message (codebooks + range coder of
  :mod:`tokenbounds.quant` / :mod:`tokenbounds.bounds.coding`) and its exact decoder.
* :func:`parse_spec`, :func:`build_model`, :func:`compress_candidate`: spec strings such as
  ``"subspace:d=2000"``, ``"kron:rank=2"``, ``"monarch:blocks=4"``.
"""

from __future__ import annotations

from .coding import CodedModel, code_parameters, code_subspace, factor_hessians, quantize_parameters
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
from .monarch import MonarchLinear
from .spec import CompressionSpec, build_base, build_model, parse_spec, subspace_lr
from .subspace import DenseProjector, KroneckerProjector, SubspaceModel, make_projector
from .swap import replace_linears, structured_layer

__all__ = [
    "Candidate",
    "CodedModel",
    "CompressionSpec",
    "DenseProjector",
    "KroneckerLinear",
    "KroneckerProjector",
    "MonarchLinear",
    "SubspaceModel",
    "TrainedCandidate",
    "build_base",
    "build_model",
    "calibration_batch",
    "code_candidate",
    "code_parameters",
    "code_subspace",
    "compress_candidate",
    "evaluate_loss",
    "factor_hessians",
    "factor_pair",
    "make_projector",
    "parse_spec",
    "quantize_parameters",
    "replace_linears",
    "structured_layer",
    "subspace_lr",
    "train_candidate",
]
