"""Argument checks shared by every bound (one place, so every bound rejects bad input alike).

Each check returns the validated value (as float / int) or raises ``ValueError`` saying what was
wrong and what to do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SAMPLE_DESIGNS",
    "SAMPLING_KINDS",
    "BoundInputs",
    "bound_inputs",
    "as_alpha_map",
    "as_variance_map",
    "check_alpha",
    "check_choice",
    "check_count",
    "check_delta",
    "check_finite",
    "check_in_range",
    "check_nonneg",
    "check_real",
    "check_sizes",
    "check_union_size",
    "check_vocab",
    "design_of",
    "design_text",
    "normalize_sampling",
    "prior_bits",
]

_RANGE_TOL = 1e-9

SAMPLE_DESIGNS = ("tokens", "units")
"""``"tokens"``: s points drawn uniformly with replacement; ``"units"``: s window-unit draws
(cluster sampling, spec section 3b). A full pass has no sample (s = None)."""

_SAMPLING_TEXT = {"hoeffding": "Hoeffding", "bernstein": "empirical Bernstein"}

SAMPLING_KINDS = ("hoeffding", "bernstein")


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


def check_delta(delta: Any, name: str = "delta") -> float:
    d = check_real(delta, name)
    if not 0.0 < d < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {delta!r}")
    return d


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


def check_union_size(value: Any, name: str) -> int:
    """A positive integer number of candidates in a union bound."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer (a number of candidates), got {value!r}")
    return int(value)


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


def check_in_range(value: float, lo: float, hi: float, name: str) -> None:
    """``value`` must lie in the possible loss range [lo, hi] (up to rounding)."""
    if value < lo - _RANGE_TOL * max(1.0, abs(lo)) or value > hi + _RANGE_TOL * max(1.0, abs(hi)):
        raise ValueError(f"{name}={value!r} is outside the possible loss range [{lo:.6g}, {hi:.6g}]")


def check_sizes(m: Any, s: Any, m_name: str, s_name: str) -> tuple[float, float | None]:
    """(m, s) with s <= m; s None means every point was evaluated."""
    m_val = check_count(m, m_name)
    if s is None:
        return m_val, None
    s_val = check_count(s, s_name)
    if s_val > m_val:
        raise ValueError(
            f"{s_name}={s!r} exceeds {m_name}={m!r}: the sample is drawn from the training set; "
            f"evaluate every point instead ({s_name}=None) or check the arguments are not swapped"
        )
    return m_val, s_val


def as_alpha_map(values: Any, alpha: float | None, name: str) -> dict[float, float]:
    """``{alpha: value}`` sorted by alpha, from a mapping or one float with ``alpha=...``."""
    if isinstance(values, Mapping):
        if not values:
            raise ValueError(f"{name} is an empty mapping; give at least one smoothing level")
        if alpha is not None:
            raise ValueError(f"pass alpha=... only with a single float {name}, not a mapping")
        out = {check_alpha(a): check_finite(v, f"{name}[{a}]") for a, v in values.items()}
        if len(out) != len(values):
            raise ValueError(f"{name} has duplicate smoothing levels")
        return dict(sorted(out.items()))
    if alpha is None:
        raise ValueError(
            f"{name} is a single number: pass its smoothing level alpha=..., or a mapping "
            "{alpha: value}"
        )
    return {check_alpha(alpha): check_finite(values, name)}


def as_variance_map(variance: Any, alphas: list[float], name: str) -> dict[float, float] | None:
    """``{alpha: variance >= 0}`` covering ``alphas`` (None stays None)."""
    if variance is None:
        return None
    if isinstance(variance, Mapping):
        out = {check_alpha(a): check_nonneg(v, f"{name}[{a}]") for a, v in variance.items()}
        missing = [a for a in alphas if a not in out]
        if missing:
            raise ValueError(f"{name} lacks the smoothing levels {missing}")
        return out
    if len(alphas) != 1:
        raise ValueError(f"{name} must be a mapping {{alpha: variance}} when several levels are given")
    return {alphas[0]: check_nonneg(variance, name)}


def prior_bits(coded_bits: Any, name: str = "coded_bits") -> tuple[float, str | None]:
    """``(bits, caveat)``: a code length in bits, or an information-content estimate (an object
    with ``is_code_length = False``, e.g. :func:`~tokenbounds.bounds.prequential_information_bits`),
    which no bound accepts as a prior without marking its result heuristic (the caveat says why)."""
    if getattr(coded_bits, "is_code_length", True) is False:
        bits = check_nonneg(coded_bits.bits, f"{name}.bits")
        return bits, (f"heuristic, not a bound: the prior is an information-content estimate "
                      f"({coded_bits.source}), not the length of a prefix-free code fixed before "
                      "seeing the data")
    return check_nonneg(coded_bits, name), None


def design_of(s: float | None, sample_design: str) -> str:
    """``"full-pass"`` without a sample, else the checked ``sample_design``."""
    check_choice(sample_design, "sample_design", SAMPLE_DESIGNS)
    return "full-pass" if s is None else sample_design


def design_text(design: str, s: float | None, sampling: str) -> str:
    """How a result's sampling term was obtained, for its label."""
    if design == "full-pass":
        return "full pass"
    what = "window-unit draws" if design == "units" else "sampled points"
    return f"{_SAMPLING_TEXT[sampling]} sampling term, s = {s:.6g} {what}"


def normalize_sampling(sampling: str) -> str:
    """Accept "hoeffding", "bernstein" / "empirical-bernstein" / "eb"."""
    aliases = {"hoeffding": "hoeffding", "bernstein": "bernstein",
               "empirical-bernstein": "bernstein", "empirical_bernstein": "bernstein",
               "eb": "bernstein"}
    if sampling not in aliases:
        raise ValueError(
            f"sampling must be 'hoeffding' or 'bernstein' (empirical Bernstein), got {sampling!r}"
        )
    return aliases[sampling]


@dataclass(frozen=True)
class BoundInputs:
    """The checked arguments every smoothed-loss bound starts from."""

    delta: float
    vocab_size: int
    coded_bits: float
    prior_caveat: str | None
    extra_bits: float
    sampling: str
    sample_reuse: int
    m: float
    s: float | None
    design: str
    empirical: dict[float, float]
    variance: dict[float, float] | None

    @property
    def alphas(self) -> list[float]:
        return list(self.empirical)


def bound_inputs(*, empirical_bits: Any, variance_bits: Any, alpha: float | None, coded_bits: Any,
                 m: Any, s: Any, names: tuple[str, str], vocab_size: Any, delta: Any, extra_bits: Any,
                 alpha_cost: str, alpha_costs: tuple[str, ...], sampling: str, sample_design: str,
                 sample_reuse: Any) -> BoundInputs:
    """Validate the arguments shared by the token, document and Freedman bounds."""
    d = check_delta(delta)
    v = check_vocab(vocab_size)
    coded, caveat = prior_bits(coded_bits)
    extra = check_nonneg(extra_bits, "extra_bits")
    check_choice(alpha_cost, "alpha_cost", alpha_costs)
    kind = normalize_sampling(sampling)
    reuse = check_union_size(sample_reuse, "sample_reuse")
    m_val, s_val = check_sizes(m, s, *names)
    design = design_of(s_val, sample_design)
    emp = as_alpha_map(empirical_bits, alpha, "empirical_bits")
    var = as_variance_map(variance_bits, list(emp), "variance_bits")
    return BoundInputs(delta=d, vocab_size=v, coded_bits=coded, prior_caveat=caveat, extra_bits=extra,
                       sampling=kind, sample_reuse=reuse, m=m_val, s=s_val, design=design,
                       empirical=emp, variance=var)
