"""The result of an evaluation: a frozen, typed :class:`Evaluation`, built once from the run
and its merged statistics, written into ``stats.json`` and rendered by
:mod:`tokenbounds.eval.report` (which only reads it).

``stats.json`` (format ``tokenbounds.evaluate/2``) is::

    {<the LossStats state of every scored token, with multiplicity>,   # old readers keep working
     "unit_stats": <the UnitStats state>,                               # window-unit sampled mode only
     "evaluation": Evaluation.to_dict()}

``evaluation.scoring`` records the context rule and the sample (``mode``, ``window``,
``stride``, ``units``, ``draws``, ``full_pass``, ``prefix_token``, ``reset_at_eot``);
``tokenbounds.bounds.from_stats`` reads the whole document.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

__all__ = ["STATS_FORMAT", "CodedSize", "Evaluation", "ModelInfo", "RunInfo", "Scoring", "freeze", "thaw"]

STATS_FORMAT = "tokenbounds.evaluate/2"


def freeze(obj: Any) -> Any:
    """Read-only deep copy: dicts become mappingproxies, lists tuples."""
    if isinstance(obj, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return tuple(freeze(v) for v in obj)
    return obj


def thaw(obj: Any) -> Any:
    """Plain JSON-able copy of a frozen object (dataclasses via their fields)."""
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: thaw(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {k: thaw(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [thaw(v) for v in obj]
    return obj


class _Frozen:
    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, freeze(getattr(self, f.name)))

    def to_dict(self) -> dict[str, Any]:
        return thaw(self)


@dataclass(frozen=True)
class Scoring(_Frozen):
    """The context rule and the sample (``spec/bounds.md`` sections 3, 3b).

    ``units``: window units in the data; ``draws``: s, data points drawn (None in a full pass);
    ``units_scored``: distinct units evaluated; ``scored_tokens``: their targets;
    ``tokens_with_multiplicity``: the per-token statistics' count (m in a full pass)."""

    mode: str
    window: int
    stride: int
    units: int
    draws: int | None
    full_pass: bool
    prefix_token: int | None
    prefix_token_source: str
    reset_at_eot: bool
    eot_id: int | None
    units_scored: int
    scored_tokens: int
    tokens_with_multiplicity: int
    seed: int | None
    draws_sha256: str | None
    units_sha256: str
    mean_context_tokens: float


@dataclass(frozen=True)
class CodedSize(_Frozen):
    """C in bits, how it was obtained (``method``, ``description``) and its parts."""

    coded_bits: float
    method: str
    description: str
    parts: Mapping[str, Any]


@dataclass(frozen=True)
class ModelInfo(_Frozen):
    path: str
    kind: str
    model_class: str
    num_parameters: int
    fingerprint: Mapping[str, Any]
    dtype: str
    quantization: Mapping[str, Any]
    quantized_here_bits: int | None
    max_context: int | None


@dataclass(frozen=True)
class RunInfo(_Frozen):
    batch_size: int
    checkpoint_every: int
    blocks: int
    world_size: int
    device: str
    threads: int
    config_sha256: str
    seconds_total: float
    seconds_eval_this_run: float
    tokens_this_run_rank0: int
    load_average: tuple[float, ...]


@dataclass(frozen=True)
class Evaluation(_Frozen):
    """Everything about one evaluation except its raw statistics (see the module docstring).

    ``m``: data points the bound is about; ``summary``: headline numbers of the per-token
    statistics; ``by_context_length``: loss per bucket of context length; ``context_length_bounds``:
    per-bucket bounds (full passes only, each at its bucket's exact population, union paid), else
    None with ``context_length_bounds_note`` saying why; ``configuration``: every option that
    determines the result and the configurations this output directory has seen."""

    format: str
    m: int
    m_source: str
    scoring: Scoring
    coded: CodedSize
    delta: float
    extra_bits: float
    vocab_size: int
    alphas: tuple[float, ...]
    model: ModelInfo
    data: tuple[Mapping[str, Any], ...]
    summary: Mapping[str, Any]
    histogram: Mapping[str, Any]
    by_context_length: Mapping[str, Any]
    context_length_bounds: tuple[Mapping[str, Any], ...] | None
    context_length_bounds_note: str
    configuration: Mapping[str, Any]
    run: RunInfo
    recompute: str
