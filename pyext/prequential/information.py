"""Information content of a trained model from its prequential code (Finzi et al., ICLR 2025).

A training run that codes each batch with the model before it trains on it transmits the data
in ``MDL = sum_j l(theta_{j-1}; batch_j)`` bits; the final model codes the same batches in
``sum_j l(theta_n; batch_j)`` bits. The difference

    K(h) ~ MDL - sum_j l(theta_n; batch_j)         (+ K(training algorithm), not counted here)

estimates how much information the run wrote into the parameters (Finzi et al. 2025, section 4
and Fig. 3; spec/bounds.md section 8). This module reports it as an **information-content
estimate, not a valid prior**: the final model's losses are measured on the training data after
training on it, so ``2^-K(h)`` is not a prior fixed before seeing the data and cannot be passed
as ``coded_bits`` to a generalization bound.

Use it on any training run of :func:`tokenbounds.eval.train.train`::

    from tokenbounds.eval.train import get_batch, train
    from tokenbounds.prequential import PrequentialRecorder, information_content_of_run

    rec = PrequentialRecorder(cfg.steps)
    train(model, tokens, cfg, on_step=rec)               # the update is unchanged by recording
    batches = lambda s: get_batch(tokens, cfg.batch_size, model.config.context_length, cfg.seed, s)
    k = information_content_of_run(model, rec, batches)  # final model over the same batches
    print(k.k_bits, k.label)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..bounds import prequential_code_length
from ..bounds.results import _ToDict

__all__ = ["INFORMATION_LABEL", "InformationContent", "information_content", "information_content_of_run",
           "replay_losses"]

INFORMATION_LABEL = "information-content estimate (Finzi et al.), not a valid prior"
LN2 = math.log(2.0)


@dataclass(frozen=True)
class InformationContent(_ToDict):
    """``k_bits = mdl_bits - final_bits`` (Finzi et al. 2025); see the module docstring."""

    mdl_bits: float
    final_bits: float
    k_bits: float
    num_batches: int
    num_tokens: int | None
    label: str = INFORMATION_LABEL

    @property
    def k_bits_per_token(self) -> float | None:
        return None if not self.num_tokens else self.k_bits / self.num_tokens


def information_content(prequential_losses_bits: Any, final_losses_bits: Any, *,
                        num_tokens: int | None = None) -> InformationContent:
    """K(h) estimate from the prequential losses of a run and the final model's losses on the
    same batches (or tokens), entry by entry, in bits. Not clamped: a negative value means the
    final model codes its own training data worse than the run did (e.g. a diverged run)."""
    before = np.asarray(prequential_losses_bits, np.float64).reshape(-1)
    after = np.asarray(final_losses_bits, np.float64).reshape(-1)
    if before.size != after.size:
        raise ValueError(f"final_losses_bits has {after.size} entries but prequential_losses_bits has "
                         f"{before.size}: both must cover the same batches")
    mdl = prequential_code_length(before)
    final = prequential_code_length(after)
    return InformationContent(mdl_bits=mdl, final_bits=final, k_bits=mdl - final, num_batches=int(before.size),
                              num_tokens=None if num_tokens is None else int(num_tokens))


def replay_losses(model, batch_fn: Callable[[int], tuple[Any, Any]], num_steps: int, *,
                  loss_fn: Callable[[Any, Any, Any], Any] | None = None, progress: bool = False) -> np.ndarray:
    """Code length (float64 sums of per-token nats) of each batch ``batch_fn(0 .. num_steps-1)``
    under ``model`` as it is now (eval mode, no gradient). ``loss_fn`` as in
    :func:`tokenbounds.eval.train.train` (default: ``model(x, y)``'s logits, targets -100 ignored)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    out = np.zeros(int(num_steps), np.float64)
    steps = range(int(num_steps))
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="final-model pass", unit="step", dynamic_ncols=True)
    with torch.no_grad():
        for s in steps:
            x, y = batch_fn(s)
            if loss_fn is None:
                logits = model(x)
                tl = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                     ignore_index=-100, reduction="none")
            else:
                tl = loss_fn(model, x, y).reshape(-1)
            out[s] = float(tl.double()[y.reshape(-1) != -100].sum())
    model.train(was_training)
    return out


def information_content_of_run(model, recorder, batch_fn: Callable[[int], tuple[Any, Any]], *,
                               loss_fn: Callable[[Any, Any, Any], Any] | None = None,
                               progress: bool = False) -> InformationContent:
    """K(h) of a finished run: ``recorder`` (a :class:`~tokenbounds.prequential.PrequentialRecorder`
    passed as ``train(on_step=...)``) holds the prequential losses; the final ``model`` rescores
    the same ``batch_fn`` batches (``get_batch(tokens, B, T, seed, step)`` for the default
    random windows of ``train``)."""
    final = replay_losses(model, batch_fn, recorder.num_steps, loss_fn=loss_fn, progress=progress)
    return information_content(recorder.loss_bits(), final / LN2, num_tokens=int(recorder.tokens.sum()))
