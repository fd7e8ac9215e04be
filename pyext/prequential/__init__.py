"""Prequential coding, excess description length and information content of training runs.

* :mod:`.run`: the one-pass measurement (score each batch, then train on it) with nested
  prefixes and seeds -> MDL(n), EDL(n) and their normalisations (Donoway et al., arXiv 2601.04728;
  spec/bounds.md section 8);
* :mod:`.information`: Finzi et al.'s information-content estimate K(h) ~ MDL - final-model
  losses (an estimate, not a valid prior);
* :mod:`.toys`: the toy tasks of Donoway et al. (random labels, coupon collector, elicitation of
  a latent skill vs teaching new structure) on our GPT;
* :mod:`.data`, :mod:`.report`: the ``tokenbounds prequential`` command's inputs and outputs.
"""

from __future__ import annotations

from .information import (
    INFORMATION_LABEL,
    InformationContent,
    information_content,
    information_content_of_run,
    replay_losses,
)
from .run import (
    IGNORE_INDEX,
    PreparedModel,
    PrequentialConfig,
    PrequentialRecorder,
    TensorRows,
    WindowRows,
    causal_lm_token_losses,
    evaluate_rows,
    prefix_grid,
    run_prequential,
    run_seed,
    summarize,
)

__all__ = [
    "IGNORE_INDEX",
    "INFORMATION_LABEL",
    "InformationContent",
    "PreparedModel",
    "PrequentialConfig",
    "PrequentialRecorder",
    "TensorRows",
    "WindowRows",
    "causal_lm_token_losses",
    "evaluate_rows",
    "information_content",
    "information_content_of_run",
    "prefix_grid",
    "replay_losses",
    "run_prequential",
    "run_seed",
    "summarize",
]
