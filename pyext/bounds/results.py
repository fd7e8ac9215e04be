"""Frozen result types shared by every bound: one base, :class:`BoundResult`, that the token,
Freedman and generic results extend, so tables never branch on attributes.

Every result says whether it is a bound at its ``delta`` (``valid``) and what kind of statement
it is (``kind``):

* ``"high-probability"``: holds with probability >= 1 - delta (``valid=True``);
* ``"expectation"``: bounds the expected gap over the draw of the data (``delta`` is NaN);
* ``"official-formula"``: a published formula reproduced as published that does not hold at
  ``delta`` (the smoothing level chosen after seeing the sample without paying for it in the
  sampling term); ``valid=False``;
* ``"illustrative"``: a baseline computed from statistics that do not support it (e.g. a
  document-level bound from a token sample); ``valid=False``, not a bound;
* ``"heuristic"``: the prior is not a code length (an information-content estimate);
  ``valid=False``.

``caveats`` lists every reason a result is not (or not simply) a bound; ``label`` is the line a
table prints for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "KINDS",
    "Bound",
    "BoundResult",
    "FreedmanBound",
    "InformationEstimate",
    "TokenBound",
    "invalidate",
    "mark_validity",
    "to_plain",
]

KINDS = ("high-probability", "expectation", "official-formula", "illustrative", "heuristic")

OFFICIAL_UNPAID = ("official formula as published: smoothing choice unpaid in the sampling term, "
                   "not valid at delta")
"""The label of ``alpha_cost="lotfi-code"`` with a sampling term (spec section 3)."""


def to_plain(value: Any) -> Any:
    """Recursively convert dataclasses / numpy scalars / tuples into JSON-friendly objects."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {(str(k) if not isinstance(k, str) else k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


class _ToDict:
    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python objects (json.dumps-able; inf/nan stay floats)."""
        return to_plain(self)


@dataclass(frozen=True, kw_only=True)
class BoundResult(_ToDict):
    """What every bound returns: ``bound_bits = empirical_bits + complexity_bits + sampling_bits``
    (plus ``variance_bits`` for Freedman bounds), in ``units`` (bits per token, except the top-k
    error bound: an error rate).

    ``alpha`` is the smoothing level the bound uses (None when there is none), ``delta`` the
    failure probability it is stated at, ``vacuous`` compares with the uniform predictor
    (``uniform_bits``), ``valid``/``kind``/``caveats`` say whether and how it holds (module
    docstring), ``candidates`` the alternatives it minimised over (each paid for).
    """

    bound_bits: float
    empirical_bits: float
    complexity_bits: float
    sampling_bits: float
    alpha: float | None
    delta: float
    vacuous: bool
    valid: bool = True
    kind: str = "high-probability"
    label: str = ""
    caveats: tuple[str, ...] = ()
    uniform_bits: float
    loss_range_bits: float
    log_prior_nats: float
    units: str = "bits"
    candidates: tuple[dict[str, Any], ...] = ()

    @property
    def excess_bits(self) -> float:
        """The term that pays for generalization: the complexity term (the gap for Freedman)."""
        return self.complexity_bits

    @property
    def bound(self) -> float:
        return self.bound_bits


class _GenericNames:
    """The field names of the former generic ``Bound`` type, kept so existing code works."""

    @property
    def empirical(self) -> float:
        return self.empirical_bits

    @property
    def complexity(self) -> float:
        return self.complexity_bits

    @property
    def sampling(self) -> float:
        return self.sampling_bits

    @property
    def uniform(self) -> float:
        return self.uniform_bits

    @property
    def loss_range(self) -> float:
        return self.loss_range_bits


def invalidate(result: BoundResult, kind: str, caveat: str, label: str | None = None) -> BoundResult:
    """A copy of ``result`` marked not valid at its delta: ``kind`` (the first reason wins),
    ``caveat`` appended, ``label`` replaced when given, else suffixed with the caveat."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    new_kind = kind if result.valid or result.kind in ("high-probability", "expectation") else result.kind
    return dataclasses.replace(
        result, valid=False, kind=new_kind, caveats=(*result.caveats, caveat),
        label=label if label is not None else f"{result.label} [{caveat}]",
    )


def mark_validity(result: BoundResult, *, alpha_cost: str, grid: int, s: float | None, r: float,
                  delta: float, prior_caveat: str | None) -> BoundResult:
    """The validity rules shared by the token and Freedman bounds: the official smoothing cost
    (``alpha_cost="lotfi-code"``) with a sampling term and G > 1 levels does not hold at delta,
    and a prior that is not a code length makes the result heuristic."""
    if alpha_cost == "lotfi-code" and s is not None and grid > 1:
        fail = min(1.0, r * delta + grid * (1.0 - r) * delta)
        result = invalidate(
            result, "official-formula",
            f"{OFFICIAL_UNPAID}: the smoothing level is chosen among {grid} after seeing the sample "
            f"but each level's sampling term runs at the full (1 - r) delta, so the minimum holds "
            f"only with probability >= 1 - (r delta + {grid} (1 - r) delta) = {1.0 - fail:.4g}; "
            "alpha_cost='lotfi-code-corrected' or 'union' pays for it",
            label=f"{OFFICIAL_UNPAID} ({result.label})")
    if prior_caveat is not None:
        result = invalidate(result, "heuristic", prior_caveat)
    return result


@dataclass(frozen=True, kw_only=True)
class Bound(_GenericNames, BoundResult):
    """A bound without per-level bookkeeping (top-k error, parameter count, mutual information).
    ``inputs`` records every argument; ``name`` is a short name."""

    name: str
    inputs: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


@dataclass(frozen=True, kw_only=True)
class TokenBound(BoundResult):
    """Token-level (or document-level) bound (spec sections 3-4), minimised over the smoothing
    grid. ``candidates`` holds one dict per smoothing level (its Delta, extra bits, delta share,
    every term), ``chosen_among`` how many levels were compared and ``choice_cost`` how that
    choice was paid for. ``design`` is the sampling design: ``"full-pass"``, ``"tokens"`` (s
    points drawn uniformly with replacement) or ``"units"`` (s window-unit draws, spec 3b)."""

    coded_bits: float
    train_tokens: float
    sample_tokens: float | None
    vocab_size: int
    extra_bits: float
    alpha_cost: str
    sampling: str
    chosen_among: int
    choice_cost: str
    level: str = "token"
    design: str = "tokens"
    sample_reuse: int = 1


@dataclass(frozen=True, kw_only=True)
class FreedmanBound(BoundResult):
    """Empirical Freedman bound (spec section 6), minimised over smoothing, centering and lambda.

    ``bound_bits = empirical_bits + sampling_bits + gap_bits`` with
    ``gap_bits = complexity_bits + variance_bits = Delta Cc / lambda + Delta psi(lambda) S / lambda``
    and ``S`` (``scaled_variance``) the upper confidence bound on the scaled second moment about
    the centering. ``decomposition`` holds Finzi et al.'s terms when the unquantized/unsmoothed
    losses are given.
    """

    lam: float
    gap_bits: float
    variance_bits: float
    scaled_variance: float
    coded_bits: float
    train_tokens: float
    sample_tokens: float | None
    vocab_size: int
    delta_split: dict[str, float]
    extra_bits: float
    alpha_cost: str
    sampling: str
    center: str
    chosen_among: int
    choice_cost: str
    parameters_per_token_nats: float
    design: str = "tokens"
    sample_reuse: int = 1
    decomposition: dict[str, float] = field(default_factory=dict)

    @property
    def excess_bits(self) -> float:
        return self.gap_bits


@dataclass(frozen=True)
class InformationEstimate(_ToDict):
    """An estimate of a model's information content in bits that is **not** the length of a
    prefix-free code fixed before seeing the data (e.g. the prequential estimate of Finzi et al.
    2025). Passed as ``coded_bits`` to a bound, it makes the result ``kind="heuristic"``,
    ``valid=False``. Deliberately not convertible with ``float()``: only the bounds' prior check
    accepts it, and it marks the result."""

    is_code_length: ClassVar[bool] = False

    bits: float
    source: str
    details: dict[str, Any] = field(default_factory=dict)
