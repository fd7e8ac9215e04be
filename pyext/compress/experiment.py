"""Train and code one compressed candidate, evaluate it, bound it: what the benchmark and the demo
call.

* :func:`compress_candidate` -- given a spec string (``"subspace:d=2000"``, ``"kron"``,
  ``"monarch:blocks=4"``, ``"dense"``, ...) and a GPT config: build the model from a seed
  (:func:`tokenbounds.compress.spec.build_model`), train it with
  :func:`tokenbounds.eval.train.train` (resumable through ``checkpoint_path``), code it
  (:mod:`tokenbounds.compress.coding`) and return the decoded model to evaluate with its coded
  size. :func:`train_candidate` and :func:`code_candidate` are its two halves (train once, code
  at several bit widths).
* :func:`evaluate_loss` -- the one place that evaluates the empirical loss (window units of the
  training tokens through :func:`tokenbounds.eval.score.score_tokens`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch.nn as nn

from .coding import CodedModel, _evaluable, code_parameters, code_subspace, code_trainable
from .spec import CompressionSpec, build_model, parse_spec, pretrained_base, subspace_lr

__all__ = [
    "Candidate",
    "TrainedCandidate",
    "calibration_batch",
    "code_candidate",
    "compress_candidate",
    "evaluate_loss",
    "train_candidate",
]


@dataclass
class TrainedCandidate:
    """A trained model of one spec (``model`` is a SubspaceModel for subspace specs)."""

    spec: CompressionSpec
    config: Any  # GPTConfig
    seed: int
    model: nn.Module
    train_config: Any  # TrainConfig actually used (the subspace learning rate filled in)
    train_result: Any  # TrainResult
    base_weights: Any = None  # QuantizedModel of a pretrained base (None: the seeded init)

    @property
    def num_trained(self) -> int:
        """Number of trained values: d for a subspace model, the adapters (and ``train=``
        parameters) for a LoRA model, else every parameter."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def unquantized_model(self) -> nn.Module:
        """The trained model before coding, as the plain module that is evaluated (a copy: the
        subspace materialized, LoRA adapters merged), in eval mode: the paired reference of the
        quantization gap."""
        import copy

        net = self.model.materialize() if self.spec.subspace is not None else copy.deepcopy(self.model)
        return _evaluable(net)


@dataclass
class Candidate:
    """A trained and coded candidate: ``code.model`` is the decoded model to evaluate."""

    trained: TrainedCandidate
    code: CodedModel

    @property
    def model(self) -> nn.Module:
        return self.code.model

    @property
    def coded_bits(self) -> float:
        return self.code.coded_bits


def train_candidate(
    spec: str | CompressionSpec,
    config,
    tokens: np.ndarray,
    train_config,
    *,
    seed: int = 0,
    checkpoint_path: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    base_weights=None,
) -> TrainedCandidate:
    """Build ``spec``'s model from ``seed`` and train it on ``tokens`` with ``train_config``
    (a :class:`tokenbounds.eval.train.TrainConfig`; for a subspace spec its ``lr`` is replaced by
    the spec's ``lr`` or :func:`tokenbounds.compress.spec.subspace_lr`). ``base_weights``: start
    from a pretrained base (a QuantizedModel of the plain architecture, see
    :func:`tokenbounds.compress.spec.build_base`) instead of the seeded init."""
    from ..eval.train import train

    sp = parse_spec(spec)
    if pretrained_base(sp) is not None and base_weights is None:
        raise ValueError(f"spec {str(sp)!r} trains on the pretrained base {pretrained_base(sp)!r}: pass its code "
                         "as base_weights= (a tokenbounds.quant.QuantizedModel of the plain architecture)")
    model = build_model(config, sp, seed=seed, base_weights=base_weights)
    tcfg = train_config
    if sp.subspace is not None:
        lr = sp.subspace.get("lr") or subspace_lr(tcfg.lr, model.num_parameters, model.dim)
        tcfg = replace(tcfg, lr=lr)
    key = {"spec": str(sp), "seed": seed, "model": asdict(config)}
    if base_weights is not None:
        key["base"] = _base_digest(base_weights)
    meta = {"compress": json.dumps(key, sort_keys=True)}
    result = train(model, tokens, tcfg, checkpoint_path=checkpoint_path, progress=progress, meta=meta, log=log)
    return TrainedCandidate(spec=sp, config=config, seed=seed, model=model, train_config=tcfg,
                            train_result=result, base_weights=base_weights)


def _base_digest(base_weights) -> str:
    """Hash of a pretrained base's decoded values (keys a resumed checkpoint to its base)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(base_weights.dequantized_state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def calibration_batch(tokens: np.ndarray, context_length: int, *, sequences: int = 128, seed: int = 3):
    """Calibration sequences for the proxy Hessians (``get_batch`` of the training loop; the
    demo pipeline uses the same 128 x context batch at seed 3)."""
    from ..eval.train import get_batch

    x, _ = get_batch(tokens, sequences, context_length, seed, 0)
    return x


def code_candidate(
    trained: TrainedCandidate,
    calibration_tokens=None,
    *,
    bits: int = 4,
    codebook: str = "uniform",
    method: str = "ldlq",
    incoherence: bool = True,
    quant_seed: int = 0,
) -> CodedModel:
    """Code a trained candidate: z for a subspace model (subspace, sublora), the trained tensors
    of a LoRA model, every parameter otherwise (for the last two ``calibration_tokens`` -- e.g.
    :func:`calibration_batch` -- give the proxy Hessians)."""
    common = {"spec": str(trained.spec), "init_seed": trained.seed, "bits": bits, "codebook": codebook,
              "method": method, "incoherence": incoherence, "quant_seed": quant_seed}
    if trained.spec.subspace is not None:
        return code_subspace(trained.model, **common, base_weights=trained.base_weights)
    if calibration_tokens is None:
        raise ValueError("coding the parameters needs calibration_tokens (see calibration_batch)")
    if trained.spec.adapter is not None:
        return code_trainable(trained.model, calibration_tokens, **common, base_weights=trained.base_weights)
    return code_parameters(trained.model, calibration_tokens, **common)


def compress_candidate(
    spec: str | CompressionSpec,
    config,
    tokens: np.ndarray,
    train_config,
    *,
    seed: int = 0,
    bits: int = 4,
    codebook: str = "uniform",
    method: str = "ldlq",
    incoherence: bool = True,
    quant_seed: int = 0,
    checkpoint_path: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    base_weights=None,
) -> Candidate:
    """Train and code one candidate of the demo's grid (see the module docstring).

    Returns a :class:`Candidate`: ``candidate.model`` (decoded, eval mode) is what to evaluate,
    ``candidate.coded_bits`` its code length (header + weights/coordinates; add the tokenizer),
    ``candidate.code.encode()`` the message and ``CodedModel.decode(...).build()`` the decoder.
    ``base_weights``: train on a pretrained base (lora / sublora / subspace specs; its code is part
    of the message and counted) instead of the seeded init.
    """
    trained = train_candidate(spec, config, tokens, train_config, seed=seed, checkpoint_path=checkpoint_path,
                              progress=progress, log=log, base_weights=base_weights)
    calib = None if trained.spec.subspace is not None else calibration_batch(tokens, config.context_length)
    code = code_candidate(trained, calib, bits=bits, codebook=codebook, method=method, incoherence=incoherence,
                          quant_seed=quant_seed)
    return Candidate(trained=trained, code=code)


def evaluate_loss(
    model: nn.Module,
    tokens: np.ndarray,
    num_samples: int | None,
    *,
    seed: int,
    eot_id: int | None = 0,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "eval",
):
    """The statistics of ``model`` on the training tokens through the window engine of
    ``tokenbounds evaluate`` (:func:`tokenbounds.eval.score.score_tokens`; windows of the model's
    context, stride T / 2): the window units of ``num_samples`` uniform draws (seed ``seed``; a
    sampled estimate whose sampling term the bounds pay, with s = the draws) or, with
    ``num_samples=None``, a full pass (no sampling term). Returns a
    :class:`tokenbounds.eval.score.Scored` (``.stats``; ``.document(coded_bits, ...)`` for
    ``tokenbounds.bounds.from_stats``). The one evaluation path of this package."""
    from ..eval.score import score_tokens

    return score_tokens(model, tokens, window=window or int(model.config.context_length), stride=stride,
                        sample_tokens=num_samples, seed=seed, eot_id=eot_id, batch_size=batch_size,
                        progress=progress, desc=desc)
