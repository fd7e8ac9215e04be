"""Generalization bounds for language models from summary statistics (spec ``bounds.md``).

Pure functions (numpy / scipy / constriction; no torch) from losses and code lengths to frozen
result dataclasses exposing every component and ``to_dict()``:

* code lengths and priors: :func:`prefix_free_bits`, :func:`log_prior_nats`,
  :func:`message_length_bits` (exact range coder or the official count),
  :func:`encode_symbols` / :func:`decode_symbols`;
* bounds: :func:`token_bound`, :func:`topk_bound`, :func:`document_bound`,
  :func:`freedman_bound` / :func:`freedman_gap`, :func:`parameter_count_bound`,
  :func:`mutual_information_bound` (in expectation);
* sampling terms: :func:`hoeffding_term`, :func:`bernstein_term`, :func:`variance_upper_bound`;
* :func:`from_stats` / :func:`read_stats`: every bound from saved statistics (a ``LossStats``, a
  window-unit ``UnitStats`` or the ``stats.json`` of ``tokenbounds evaluate``), one parser;
* scaling and prequential helpers (:func:`prequential_information_bits` is an information-content
  estimate, not a code length: a bound given it is marked heuristic).

Every result extends :class:`BoundResult` (``bound_bits, empirical_bits, complexity_bits,
sampling_bits, alpha, delta, vacuous, valid, kind, label``); ``valid=False`` results say why in
``caveats``.
"""

from __future__ import annotations

from .classic import mutual_information_bound, parameter_count_bound
from .coding import (
    EncodedSymbols,
    MessageLength,
    decode_symbols,
    elias_gamma_bits,
    encode_symbols,
    log_prior_nats,
    message_length_bits,
    prefix_free_bits,
)
from .freedman import LAMBDA_GRID, freedman_bound, freedman_gap, psi
from .from_stats import BoundTable, StatsView, from_stats, read_stats
from .prequential import (
    EDLResult,
    coupon_collector_edl_fraction,
    excess_description_length,
    prequential_code_length,
    prequential_complexity_bits,
    prequential_information_bits,
)
from .prior import ALPHA_COSTS, loss_range_bits, max_loss_bits, min_loss_bits, uniform_loss_bits
from .results import Bound, BoundResult, FreedmanBound, InformationEstimate, TokenBound
from .sampling import bernstein_term, hoeffding_term, sampling_term, variance_upper_bound
from .scaling import (
    CHINCHILLA,
    PowerLawFit,
    chinchilla_loss_nats,
    chinchilla_tokens,
    compute_optimal,
    fit_power_law,
    training_flops,
)
from .token import document_bound, token_bound, topk_bound

__all__ = [
    "ALPHA_COSTS",
    "CHINCHILLA",
    "LAMBDA_GRID",
    "Bound",
    "BoundResult",
    "BoundTable",
    "EDLResult",
    "EncodedSymbols",
    "FreedmanBound",
    "InformationEstimate",
    "MessageLength",
    "PowerLawFit",
    "StatsView",
    "TokenBound",
    "bernstein_term",
    "chinchilla_loss_nats",
    "chinchilla_tokens",
    "compute_optimal",
    "coupon_collector_edl_fraction",
    "decode_symbols",
    "document_bound",
    "elias_gamma_bits",
    "encode_symbols",
    "excess_description_length",
    "fit_power_law",
    "freedman_bound",
    "freedman_gap",
    "from_stats",
    "hoeffding_term",
    "log_prior_nats",
    "loss_range_bits",
    "max_loss_bits",
    "message_length_bits",
    "min_loss_bits",
    "mutual_information_bound",
    "parameter_count_bound",
    "prefix_free_bits",
    "prequential_code_length",
    "prequential_complexity_bits",
    "prequential_information_bits",
    "psi",
    "read_stats",
    "sampling_term",
    "token_bound",
    "topk_bound",
    "training_flops",
    "uniform_loss_bits",
    "variance_upper_bound",
]
