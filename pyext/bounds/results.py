"""Frozen result types shared by every bound, and input validation helpers."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Bound", "FreedmanBound", "TokenBound", "to_plain"]


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


@dataclass(frozen=True)
class Bound(_ToDict):
    """A generic bound: ``bound = empirical + complexity + sampling`` (in the loss's units).

    ``kind`` is ``"high-probability"`` (holds with probability >= 1 - delta) or
    ``"expectation"`` (a bound on the expected generalization gap, e.g. the mutual-information
    bound). ``vacuous`` compares ``bound`` with ``uniform`` (the loss of the uniform predictor).
    ``inputs`` records every argument; ``candidates`` the alternatives it minimised over.
    """

    name: str
    bound: float
    empirical: float
    complexity: float
    sampling: float
    vacuous: bool
    uniform: float
    delta: float
    loss_range: float
    log_prior_nats: float
    units: str = "bits"
    kind: str = "high-probability"
    alpha: float | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    candidates: tuple[dict[str, Any], ...] = ()
    notes: str = ""


@dataclass(frozen=True)
class TokenBound(_ToDict):
    """Token-level bound (spec section 3), minimised over the smoothing grid.

    ``bound_bits = empirical_bits + complexity_bits + sampling_bits`` at the chosen ``alpha``.
    ``candidates`` holds one dict per smoothing level (its Delta, extra bits, delta share, every
    term), ``chosen_among`` how many levels were compared and ``choice_cost`` how that choice
    was paid for.
    """

    bound_bits: float
    alpha: float
    empirical_bits: float
    complexity_bits: float
    sampling_bits: float
    vacuous: bool
    uniform_bits: float
    loss_range_bits: float
    log_prior_nats: float
    coded_bits: float
    train_tokens: float
    sample_tokens: float | None
    vocab_size: int
    delta: float
    extra_bits: float
    alpha_cost: str
    sampling: str
    chosen_among: int
    choice_cost: str
    level: str = "token"
    candidates: tuple[dict[str, Any], ...] = ()

    @property
    def bound(self) -> float:
        return self.bound_bits


@dataclass(frozen=True)
class FreedmanBound(_ToDict):
    """Empirical Freedman bound (spec section 6), minimised over smoothing and lambda.

    ``bound_bits = empirical_bits + sampling_bits + gap_bits`` with
    ``gap_bits = complexity_bits + variance_bits = Delta Cc / lambda + Delta psi(lambda) S / lambda``
    and ``S`` (``scaled_variance``) the upper confidence bound on the scaled second moment about
    the centering. ``decomposition`` holds Finzi et al.'s terms when the unquantized/unsmoothed
    losses are given.
    """

    bound_bits: float
    alpha: float
    lam: float
    empirical_bits: float
    sampling_bits: float
    gap_bits: float
    complexity_bits: float
    variance_bits: float
    scaled_variance: float
    vacuous: bool
    uniform_bits: float
    loss_range_bits: float
    log_prior_nats: float
    coded_bits: float
    train_tokens: float
    sample_tokens: float | None
    vocab_size: int
    delta: float
    delta_split: dict[str, float]
    extra_bits: float
    alpha_cost: str
    sampling: str
    center: str
    chosen_among: int
    choice_cost: str
    parameters_per_token_nats: float
    decomposition: dict[str, float] = field(default_factory=dict)
    candidates: tuple[dict[str, Any], ...] = ()

    @property
    def bound(self) -> float:
        return self.bound_bits


# ---------------------------------------------------------------------------- validation


def check_delta(delta: float, name: str = "delta") -> float:
    d = check_real(delta, name)
    if not 0.0 < d < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {delta!r}")
    return d


def check_real(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(v):
        raise ValueError(f"{name} is NaN; check the statistics it was computed from")
    return v


def check_finite(value: Any, name: str) -> float:
    v = check_real(value, name)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_nonneg(value: Any, name: str) -> float:
    v = check_finite(value, name)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def check_count(value: Any, name: str, minimum: float = 1) -> float:
    """A (possibly huge, so float-valued) count >= minimum."""
    v = check_finite(value, name)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    return v


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    a = check_real(alpha, name)
    if not 0.0 < a <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {alpha!r}")
    return a


def check_vocab(vocab_size: Any) -> int:
    if isinstance(vocab_size, bool) or vocab_size is None:
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    try:
        v = int(vocab_size)
    except (TypeError, ValueError):
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}") from None
    if v != vocab_size or v < 2:
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    return v


def check_choice(value: str, name: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value
