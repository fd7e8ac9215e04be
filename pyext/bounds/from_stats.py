"""Every applicable bound from saved evaluation statistics, without rerunning a model and
without torch.

One parser, :func:`read_stats`, reads everything the evaluation writes: a ``LossStats`` (object,
state dict, JSON text or path), a ``UnitStats`` (window-unit draws, spec section 3b), or the
``stats.json`` of ``tokenbounds evaluate`` (the per-token LossStats state at top level, the
``"unit_stats"`` of a window-unit sample, and ``"evaluation"``: m, the scoring design, the coded
size, delta, extra bits, V). It decodes the states with ``LossStats`` / ``UnitStats`` themselves
(numpy only), validates them, and decides the sampling design:

* ``"full-pass"``: every one of the m points evaluated once: no sampling term (count = m);
* ``"units"``: s window-unit draws: the sampling terms use the s unit means (Hoeffding /
  empirical Bernstein with s = draws; Freedman bounds S_c from the units' W(c), spec 3b);
* ``"tokens"``: s tokens drawn uniformly with replacement (the paper's design).

Explicit arguments that contradict the document are an error.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._checks import check_count, check_delta, check_nonneg, check_union_size, prior_bits
from ._stats import LOSS_FORMAT, UNIT_FORMAT, decode_loss_stats, decode_unit_stats
from .classic import mutual_information_bound, parameter_count_bound
from .freedman import freedman_bound
from .results import OFFICIAL_UNPAID, BoundResult, _ToDict, invalidate, to_plain
from .token import document_bound, token_bound, topk_bound

__all__ = ["BoundTable", "StatsView", "from_stats", "read_stats"]

EVALUATE_FORMATS = ("tokenbounds.evaluate/1", "tokenbounds.evaluate/2")

OFFICIAL_LABEL = f"token, {OFFICIAL_UNPAID} (lotfi-code, Hoeffding)"
CORRECTED_LABEL = "token, official formula corrected (lotfi-code, Hoeffding, sampling at (1 - r) delta / G)"
ILLUSTRATIVE = ("illustrative, not a bound: the token statistics' mean stands in for the per-document "
                "mean and no document sampling term is paid")


@dataclass(frozen=True)
class StatsView:
    """What the bounds need from one evaluation, whatever it was read from.

    ``tokens``: the per-token ``LossStats`` (None when only a UnitStats was given; in a
    window-unit sample it covers every scored token with multiplicity and is not used for the
    sampling terms); ``units``: the ``UnitStats`` of a window-unit sample; ``design``:
    ``"full-pass"``, ``"tokens"`` or ``"units"``; ``evaluation``: the document's evaluation
    record (None for plain statistics).
    """

    tokens: Any
    units: Any
    design: str
    evaluation: dict[str, Any] | None = None
    source: str = "LossStats"

    @property
    def alphas(self) -> tuple[float, ...]:
        return (self.units if self.tokens is None else self.tokens).alphas

    @property
    def vocab_size(self) -> int | None:
        for st in (self.tokens, self.units):
            if st is not None and st.vocab_size is not None:
                return int(st.vocab_size)
        return None

    @property
    def count(self) -> int:
        """Evaluated tokens (with multiplicity)."""
        return int(self.units.tokens if self.tokens is None else self.tokens.count)

    @property
    def sample_size(self) -> int | None:
        """s of the sampling terms: None for a full pass, the draws for units, else the count."""
        if self.design == "full-pass":
            return None
        return int(self.units.draws) if self.design == "units" else int(self.tokens.count)

    @property
    def _bound_stats(self):
        return self.units if self.design == "units" else self.tokens

    @property
    def mean_bits(self) -> dict[float, float]:
        """Per alpha, the empirical term: token mean, or the mean of the drawn units' means."""
        return self._bound_stats.mean_bits

    @property
    def variance_bits(self) -> dict[float, float]:
        """Per alpha, the unbiased sample variance of the points the sampling term averages."""
        return {a: float(v) for a, v in zip(self.alphas, self._bound_stats.variance_bits, strict=True)}

    @property
    def nll_mean_bits(self) -> float:
        """Mean unsmoothed loss, estimated the way ``mean_bits`` is."""
        return float(self._bound_stats.mean_nll_bits)

    def has_topk(self, k: int) -> bool:
        st = self._bound_stats
        return k in (st.topk_err_sum if self.design == "units" else st.topk_correct)

    def topk_error(self, k: int) -> float:
        return float(self._bound_stats.topk_error(k))

    def topk_error_variance(self, k: int) -> float | None:
        """Sample variance of the per-draw errors for units; None (Bernoulli) for tokens."""
        return float(self.units.topk_error_variance(k)) if self.design == "units" else None


def _load(value: Any, what: str) -> dict[str, Any]:
    """A state dict from an object with ``state_dict()``, a dict, JSON text or a JSON path."""
    if hasattr(value, "state_dict") and callable(value.state_dict):
        return value.state_dict()
    if isinstance(value, (str, os.PathLike)):
        text = str(value)
        if not text.lstrip().startswith("{"):
            try:
                with open(text) as fh:
                    text = fh.read()
            except OSError as exc:
                raise ValueError(f"cannot read statistics file {value!s}: {exc}") from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"statistics are not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a LossStats / UnitStats, its state dict, a JSON string or a "
                         f"path, got {type(value).__name__}")
    return dict(value)


def _agree(name: str, values: dict[str, Any]) -> Any:
    """The one value every non-None source gives (error if two disagree)."""
    given = {src: v for src, v in values.items() if v is not None}
    distinct = {float(v) if isinstance(v, (int, float)) else v for v in given.values()}
    if len(distinct) > 1:
        detail = ", ".join(f"{src}: {v!r}" for src, v in given.items())
        raise ValueError(f"{name} disagrees between sources ({detail}); omit the explicit value to use "
                         "the document's, or check that the files belong together")
    return next(iter(given.values()), None)


def read_stats(loss_stats: Any, *, units: Any = None, full_pass: bool | None = None) -> StatsView:
    """Read and validate statistics (module docstring): ``loss_stats`` a LossStats / UnitStats /
    stats.json document (object, state dict, JSON text or path); ``units`` a UnitStats of the
    window-unit draws (object, state, JSON, path) when not inside the document; ``full_pass``
    True / False to state the design of plain statistics (None: from the document, else a
    per-token sample). Returns a :class:`StatsView`."""
    state = _load(loss_stats, "loss_stats")
    fmt = state.get("format")
    evaluation = state.get("evaluation")
    if evaluation is not None and not isinstance(evaluation, Mapping):
        raise ValueError("the document's 'evaluation' must be a JSON object")
    tokens = None
    unit_state = None
    if fmt == UNIT_FORMAT:
        unit_state = state
        source = "UnitStats"
    elif fmt == LOSS_FORMAT or fmt in EVALUATE_FORMATS:
        tokens = decode_loss_stats(state)
        unit_state = state.get("unit_stats")
        source = "LossStats" if evaluation is None else f"stats.json ({evaluation.get('format', 'evaluate')})"
    else:
        raise ValueError(f"not a LossStats / UnitStats state or stats.json document (format={fmt!r})")
    if units is not None:
        if unit_state is not None:
            raise ValueError("units= is given but the statistics already hold a UnitStats; pass one of them")
        unit_state = _load(units, "units")
        if unit_state.get("format") != UNIT_FORMAT:
            raise ValueError(f"units must be a UnitStats state (format={unit_state.get('format')!r})")
    unit = None if unit_state is None else decode_unit_stats(dict(unit_state))

    ev = dict(evaluation or {})
    scoring = ev.get("scoring") or {}
    if not isinstance(scoring, Mapping):
        raise ValueError("evaluation.scoring must be a JSON object")
    mode, doc_full = scoring.get("mode"), scoring.get("full_pass")
    if unit is not None:
        if full_pass or doc_full:
            raise ValueError("the statistics are a window-unit sample (UnitStats), not a full pass; "
                             "drop full_pass=True / --full-pass")
        if mode == "per-token":
            raise ValueError("evaluation.scoring.mode is 'per-token' but the document holds unit_stats")
        design = "units"
    elif doc_full:
        if full_pass is False:
            raise ValueError("the document records a full pass (evaluation.scoring.full_pass); "
                             "full_pass=False contradicts it")
        design = "full-pass"
    elif full_pass:
        if scoring and doc_full is False:
            raise ValueError("full_pass=True but the document records a sample (evaluation.scoring."
                             "full_pass is false)")
        design = "full-pass"
    else:
        if mode == "windows":
            raise ValueError(
                "the document is a window-unit sample but holds no unit_stats; its per-token "
                "LossStats counts the tokens of the drawn windows, which are not independent draws "
                "and cannot be used as a per-token sample")
        design = "tokens"
    view = StatsView(tokens=tokens, units=unit, design=design, evaluation=evaluation, source=source)

    if tokens is not None and unit is not None:
        if tuple(tokens.alphas) != tuple(unit.alphas):
            raise ValueError(f"LossStats alphas {tokens.alphas} differ from UnitStats alphas {unit.alphas}")
        if tokens.count != unit.tokens:
            raise ValueError(f"LossStats counts {tokens.count} tokens but the UnitStats' draws hold "
                             f"{unit.tokens}; they are not the same evaluation")
    _agree("vocab_size", {"LossStats": None if tokens is None else tokens.vocab_size,
                          "UnitStats": None if unit is None else unit.vocab_size,
                          "evaluation.vocab_size": ev.get("vocab_size")})
    if design == "units":
        _agree("the number of draws", {"UnitStats.draws": unit.draws, "evaluation.scoring.draws": scoring.get("draws")})
    elif design == "tokens":
        _agree("the number of sampled tokens", {"LossStats.count": tokens.count,
                                                "evaluation.scoring.draws": scoring.get("draws"),
                                                "evaluation.s": ev.get("s")})
    return view


def _doc_coded_bits(ev: Mapping[str, Any]) -> float | None:
    coded = ev.get("coded")
    if isinstance(coded, Mapping):
        coded = coded.get("coded_bits")
    return None if coded is None else float(coded)


def _sample_digest(ev: Mapping[str, Any] | None) -> str | None:
    """The positions digest of a document's sample, wherever the evaluation records it."""
    if not ev:
        return None
    for key in ("sample", "scoring"):
        part = ev.get(key)
        if isinstance(part, Mapping):
            for name in ("positions_sha256", "draws_sha256", "units_sha256"):
                if part.get(name):
                    return str(part[name])
    return None


def _paired_unquantized(st: StatsView, unquantized_stats: Any) -> float:
    """Lhat(h) of the unquantized model on exactly the bound's tokens (checked)."""
    uq = read_stats(unquantized_stats)
    plain_full = uq.evaluation is None and uq.design == "tokens" and st.design == "full-pass"
    if uq.design != st.design and not plain_full:
        raise ValueError(f"unquantized_stats is a {uq.design} evaluation but the bound's statistics are "
                         f"{st.design}; evaluate the unquantized model on the same tokens")
    if (st.sample_size if plain_full else uq.sample_size, uq.count) != (st.sample_size, st.count):
        raise ValueError(f"unquantized_stats covers {uq.count} tokens ({uq.sample_size} draws) but the "
                         f"bound's statistics cover {st.count} ({st.sample_size}); the quantization gap "
                         "must be paired: evaluate both models on exactly the same tokens")
    a, b = _sample_digest(st.evaluation), _sample_digest(uq.evaluation)
    if a is not None and b is not None and a != b:
        raise ValueError("unquantized_stats was evaluated on other positions than the bound's sample "
                         f"(digest {b[:12]}... vs {a[:12]}...); the quantization gap must be paired")
    value = uq.nll_mean_bits
    if not math.isfinite(value):
        raise ValueError("unquantized_stats has no finite unsmoothed loss (nll_moments)")
    return value


@dataclass(frozen=True)
class BoundTable(_ToDict):
    """Every bound computed from one set of statistics. ``bounds`` maps a label to a result (each
    at the full delta, none labelled best; rows with ``valid=False`` are not bounds at delta and
    say why); ``best`` is the minimum over ``best["among"]``, each of those K candidates
    recomputed at delta / K (spec section 9)."""

    bounds: dict[str, BoundResult]
    best: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def primary(self) -> dict[str, str]:
        """Stable names of the headline rows whatever the design: ``{"token": label,
        "freedman": label}`` (the paper's token bound; Freedman with empirical Bernstein)."""
        among = self.best["among"]
        tok = next(lb for lb in among if lb.startswith("token"))
        fre = [lb for lb in among if lb.startswith("Freedman")][-1]
        return {"token": tok, "freedman": fre}

    def rows(self) -> list[dict[str, Any]]:
        """One dict per bound: bound (the key), value, empirical, complexity (the Freedman gap for
        Freedman rows), sampling, alpha, vacuous, kind, valid, label, delta."""
        return [{"bound": label, "value": b.bound_bits, "empirical": b.empirical_bits,
                 "complexity": b.excess_bits, "sampling": b.sampling_bits, "alpha": b.alpha,
                 "vacuous": b.vacuous, "kind": b.kind, "valid": b.valid, "label": b.label,
                 "delta": b.delta}
                for label, b in self.bounds.items()]

    def format_table(self) -> str:
        width = 44
        head = (f"{'bound':<{width}} {'value':>10} {'empirical':>10} {'complexity':>11} {'sampling':>9} "
                f"{'alpha':>7}  vacuous  valid")
        lines = [head, "-" * len(head)]
        notes = []
        for r in self.rows():
            alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
            valid = "yes" if r["valid"] else f"NO [{len(notes) + 1}]"
            if not r["valid"]:
                notes.append(f"[{len(notes) + 1}] {r['kind']}: " + "; ".join(self.bounds[r["bound"]].caveats))
            name = r["bound"]
            if len(name) > width:
                lines.append(name)
                name = ""
            lines.append(
                f"{name:<{width}} {r['value']:>10.5f} {r['empirical']:>10.5f} "
                f"{r['complexity']:>11.5f} {r['sampling']:>9.5f} {alpha:>7}  {r['vacuous']!s:<7}  {valid}"
            )
        b = self.best
        lines.append("")
        lines.append(
            f"best: {b['bound_bits']:.5f} bits/token = {b['label']} (min over {len(b['among'])} "
            f"candidates, each at delta/{len(b['among'])} = {b['delta_each']:.4g})"
        )
        if notes:
            lines += ["", "not bounds at delta:", *notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": {k: to_plain(v) for k, v in self.bounds.items()},
                "best": to_plain(self.best), "inputs": to_plain(self.inputs)}


def from_stats(
    loss_stats: Any,
    coded_bits: float | None = None,
    m: float | None = None,
    *,
    delta: float | None = None,
    extra_bits: float | None = None,
    vocab_size: int | None = None,
    full_pass: bool | None = None,
    units: Any = None,
    topk: tuple[int, ...] = (1,),
    fixed_alpha: float | None = None,
    train_documents: float | None = None,
    num_parameters: float | None = None,
    bits_per_parameter: float = 16.0,
    unquantized_bits: float | None = None,
    unquantized_stats: Any = None,
    sample_reuse: int = 1,
) -> BoundTable:
    """Compute every applicable bound from saved statistics (read by :func:`read_stats`).

    ``coded_bits``: raw code length C of the model; ``m``: the number of data points the bound
    is about; both may be omitted when the document records them (``evaluation.coded``,
    ``evaluation.m``). ``delta`` (default: the document's, else 0.05) and ``extra_bits``
    (default: the document's, else 0; an explicit value may only pay more) likewise.
    ``full_pass=True`` states that plain statistics cover all m points once; ``units`` is the
    UnitStats of a window-unit sample.

    Rows (each at the full delta): the official token formula (lotfi-code, Hoeffding) -- with a
    sample it is labelled ``"official formula as published: smoothing choice unpaid in the
    sampling term, not valid at delta"`` and ``valid=False`` -- and its corrected variant; the
    union-cost token bound and the empirical Freedman bound with Hoeffding and empirical
    Bernstein sampling terms (one of each after a full pass, which has none); top-k error
    bounds; the mutual-information bound in expectation at ``fixed_alpha`` (default: the
    largest level, fixed before seeing data); with ``train_documents`` (+ ``num_parameters``)
    the document-level and parameter-counting baselines, marked illustrative (not bounds:
    token statistics do not give per-document means). ``best``: the minimum over the union-cost
    token and Freedman rows, each recomputed at delta / K.

    ``unquantized_stats``: LossStats / document of the unquantized model on exactly the same
    tokens (same design, count and sample digest), for the Freedman decomposition's paired
    quantization gap; ``unquantized_bits`` gives that loss directly (it too must be measured on
    the same tokens). ``sample_reuse=K``: K configurations were compared by bounds on this same
    sample before this one was chosen; every sampling term pays a union over K (pay the prior
    side with ``extra_bits`` += log2 K).
    """
    st = read_stats(loss_stats, units=units, full_pass=full_pass)
    ev = st.evaluation or {}
    if isinstance(coded_bits, Mapping):
        raise ValueError("coded_bits must be a number (bits)")
    coded_cmp = None if coded_bits is None else float(getattr(coded_bits, "bits", coded_bits))
    _agree("coded_bits", {"argument": coded_cmp, "evaluation.coded": _doc_coded_bits(ev)})
    coded = coded_bits if coded_bits is not None else _doc_coded_bits(ev)
    if coded is None:
        raise ValueError("coded_bits is not in the statistics; pass coded_bits=... (the model's code length)")
    prior_bits(coded)  # validate early (an information-content estimate is allowed, and marked)
    m_given = _agree("m", {"argument": m, "evaluation.m": ev.get("m")})
    if m_given is None:
        raise ValueError("m (the number of training tokens) is not in the statistics; pass m=...")
    m_val = check_count(m_given, "m")
    d = check_delta(ev.get("delta", 0.05) if delta is None else delta)
    doc_extra = ev.get("extra_bits")
    if extra_bits is not None and doc_extra is not None and float(extra_bits) < float(doc_extra):
        raise ValueError(f"extra_bits={extra_bits!r} is less than the {doc_extra!r} bits the evaluation "
                         "recorded for its choices; pass at least that (or omit it)")
    extra = check_nonneg(extra_bits if extra_bits is not None else (doc_extra or 0.0), "extra_bits")
    v = _agree("vocab_size", {"argument": vocab_size, "statistics": st.vocab_size,
                              "evaluation.vocab_size": ev.get("vocab_size")})
    if v is None:
        raise ValueError("vocab_size is not in the statistics; pass vocab_size=...")
    v = int(v)
    reuse = check_union_size(sample_reuse, "sample_reuse")
    if st.design == "full-pass" and st.count != m_val:
        raise ValueError(f"a full pass must cover every data point once, but the statistics hold "
                         f"{st.count} tokens, not m={m_val:.12g}")
    s = st.sample_size
    if s is not None and s > m_val:
        raise ValueError(f"the statistics hold {s} draws, more than m={m_val:.12g} training tokens")
    emp, var = st.mean_bits, st.variance_bits
    sample_design = "units" if st.design == "units" else "tokens"
    common = {"coded_bits": coded, "train_tokens": m_val, "sample_tokens": s, "vocab_size": v,
              "extra_bits": extra, "sample_design": sample_design, "sample_reuse": reuse}
    unsmoothed = st.nll_mean_bits if math.isfinite(st.nll_mean_bits) else None
    if unquantized_stats is not None:
        if unquantized_bits is not None:
            raise ValueError("pass unquantized_stats or unquantized_bits, not both")
        unquantized = _paired_unquantized(st, unquantized_stats)
    else:
        unquantized = unquantized_bits
    bounds: dict[str, BoundResult] = {}

    def _token(dd: float, sampling: str, cost: str = "union"):
        return token_bound(emp, delta=dd, alpha_cost=cost, sampling=sampling, variance_bits=var, **common)

    def _freedman(dd: float, sampling: str):
        return freedman_bound(emp, variance_bits=var, delta=dd, sampling=sampling,
                              unsmoothed_bits=unsmoothed,
                              unquantized_bits=unquantized if unsmoothed is not None else None,
                              unit_stats=st.units if st.design == "units" else None, **common)

    if s is None:
        bounds["token, official formula (lotfi-code), full pass"] = _token(d, "hoeffding", "lotfi-code")
        candidates = {
            "token (union, full pass)": lambda dd: _token(dd, "hoeffding"),
            "Freedman (union, full pass)": lambda dd: _freedman(dd, "hoeffding"),
        }
        kinds = ("hoeffding",)
    else:
        bounds[OFFICIAL_LABEL] = _token(d, "hoeffding", "lotfi-code")
        bounds[CORRECTED_LABEL] = _token(d, "hoeffding", "lotfi-code-corrected")
        candidates = {
            "token (union, Hoeffding)": lambda dd: _token(dd, "hoeffding"),
            "token (union, empirical Bernstein)": lambda dd: _token(dd, "bernstein"),
            "Freedman (union, Hoeffding)": lambda dd: _freedman(dd, "hoeffding"),
            "Freedman (union, empirical Bernstein)": lambda dd: _freedman(dd, "bernstein"),
        }
        kinds = ("hoeffding", "bernstein")
    for label, fn in candidates.items():
        bounds[label] = fn(d)
    for k in topk:
        if st.has_topk(k):
            for kind in kinds:
                bounds[f"top-{k} error ({'full pass' if s is None else kind})"] = topk_bound(
                    st.topk_error(k), coded_bits=coded, train_tokens=m_val, sample_tokens=s,
                    delta=d, extra_bits=extra, sampling=kind, k=k, vocab_size=v,
                    error_variance=st.topk_error_variance(k), sample_design=sample_design,
                    sample_reuse=reuse)
    a_fixed = float(fixed_alpha) if fixed_alpha is not None else max(st.alphas)
    if a_fixed not in emp:
        raise ValueError(f"fixed_alpha={fixed_alpha!r} is not one of the statistics' alphas {st.alphas}")
    bounds["mutual-information (expectation)"] = mutual_information_bound(
        emp[a_fixed], coded_bits=coded, train_points=m_val, extra_bits=extra, vocab_size=v,
        alpha=a_fixed)
    if train_documents is not None:
        docs = check_count(train_documents, "train_documents")
        bounds["document-level (illustrative, not a bound)"] = invalidate(
            document_bound(emp, coded_bits=coded, train_documents=docs, sample_documents=None,
                           vocab_size=v, delta=d, extra_bits=extra),
            "illustrative", ILLUSTRATIVE)
        if num_parameters is not None:
            bounds["parameter-count (illustrative, not a bound)"] = invalidate(
                parameter_count_bound(emp[a_fixed], num_parameters=num_parameters,
                                      train_documents=docs, bits_per_parameter=bits_per_parameter,
                                      vocab_size=v, alpha=a_fixed, delta=d),
                "illustrative", ILLUSTRATIVE)
    k_cand = len(candidates)
    paid = {label: fn(d / k_cand) for label, fn in candidates.items()}
    label = min(paid, key=lambda lb: paid[lb].bound_bits)
    best = {"label": label, "bound_bits": paid[label].bound_bits, "alpha": paid[label].alpha,
            "among": list(candidates), "delta_each": d / k_cand, "valid": paid[label].valid,
            "paid": f"each of {k_cand} candidates run at delta/{k_cand}",
            "result": paid[label]}
    inputs = {"coded_bits": float(getattr(coded, "bits", coded)), "m": m_val, "s": s,
              "design": st.design, "source": st.source, "delta": d, "extra_bits": extra,
              "vocab_size": v, "full_pass": st.design == "full-pass", "alphas": list(st.alphas),
              "train_documents": train_documents, "num_parameters": num_parameters,
              "bits_per_parameter": bits_per_parameter, "fixed_alpha": a_fixed,
              "unquantized_bits": unquantized,
              "unquantized_paired": unquantized_stats is not None, "sample_reuse": reuse}
    if st.design == "units":
        inputs["unit_tokens"] = int(st.units.tokens)
    return BoundTable(bounds=bounds, best=best, inputs=inputs)
