"""Every applicable bound from saved evaluation statistics (a ``tokenbounds.LossStats``, its
``state_dict()`` or the JSON file written by ``LossStats.to_json``), without rerunning a model
and without torch (the JSON is read here; LossStats itself is never imported)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .classic import mutual_information_bound, parameter_count_bound
from .freedman import freedman_bound
from .results import Bound, _ToDict, check_count, check_delta, check_nonneg, to_plain
from .token import document_bound, token_bound, topk_bound

__all__ = ["BoundTable", "StatsView", "from_stats", "read_stats"]


@dataclass(frozen=True)
class StatsView:
    """The fields of a LossStats state the bounds need (float64, validated)."""

    alphas: tuple[float, ...]
    vocab_size: int | None
    count: int
    mean: np.ndarray
    m2: np.ndarray
    nll_mean_bits: float
    topk_correct: dict[int, int]

    @property
    def mean_bits(self) -> dict[float, float]:
        return {a: float(m) for a, m in zip(self.alphas, self.mean, strict=True)}

    @property
    def variance_bits(self) -> dict[float, float]:
        return {a: float(v) / (self.count - 1) for a, v in zip(self.alphas, self.m2, strict=True)}

    def topk_error(self, k: int) -> float:
        return 1.0 - self.topk_correct[k] / self.count


def read_stats(loss_stats: Any) -> StatsView:
    """Accept a LossStats (anything with ``state_dict()``), its state dict, a JSON string or a
    path to the JSON file; validate it (NaN, negative counts, shapes) and return a StatsView."""
    state = loss_stats
    if hasattr(state, "state_dict") and callable(state.state_dict):
        state = state.state_dict()
    elif isinstance(state, (str, os.PathLike)):
        text = str(state)
        if not text.lstrip().startswith("{"):
            try:
                with open(text) as fh:
                    text = fh.read()
            except OSError as exc:
                raise ValueError(f"cannot read statistics file {state!s}: {exc}") from None
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"statistics are not valid JSON: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"loss_stats must be a LossStats, its state dict or a JSON path, got {type(loss_stats).__name__}")
    if state.get("format") != "tokenbounds.LossStats/1":
        raise ValueError(f"not a LossStats state (format={state.get('format')!r})")
    try:
        alphas = tuple(float(a) for a in state["alphas"])
        count = state["count"]
        mean = np.asarray(state["mean"], dtype=np.float64)
        m2 = np.asarray(state["m2"], dtype=np.float64)
        nll = state.get("nll_moments", [math.nan])
        topk = {int(k): v for k, v in state.get("topk_correct", {}).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed LossStats state: {exc!r}") from None
    if isinstance(count, bool) or int(count) != count or count < 0:
        raise ValueError(f"LossStats count must be a non-negative integer, got {count!r}")
    count = int(count)
    if count < 2:
        raise ValueError(f"LossStats holds {count} tokens; at least 2 are needed for a bound")
    if mean.shape != (len(alphas),) or m2.shape != (len(alphas),):
        raise ValueError("LossStats mean/m2 must have one entry per alpha")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(m2))):
        raise ValueError("LossStats mean/m2 contain NaN or inf; the evaluation produced bad losses")
    if np.any(m2 < 0):
        raise ValueError("LossStats m2 (sum of squared deviations) is negative")
    for k, v in topk.items():
        if isinstance(v, bool) or int(v) != v or v < 0 or v > count:
            raise ValueError(f"LossStats topk_correct[{k}]={v!r} must be an integer in [0, count]")
    vocab = state.get("vocab_size")
    return StatsView(alphas=alphas, vocab_size=None if vocab is None else int(vocab), count=count,
                     mean=mean, m2=m2, nll_mean_bits=float(nll[0]),
                     topk_correct={k: int(v) for k, v in topk.items()})


@dataclass(frozen=True)
class BoundTable(_ToDict):
    """Every bound computed from one set of statistics. ``bounds`` maps a label to a result (each
    at the full delta, none labelled best); ``best`` is the minimum over ``best_among``, each of
    those K candidates recomputed at delta / K (spec section 9)."""

    bounds: dict[str, Any]
    best: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for label, b in self.bounds.items():
            if isinstance(b, Bound):
                row = {"bound": label, "value": b.bound, "empirical": b.empirical,
                       "complexity": b.complexity, "sampling": b.sampling, "alpha": b.alpha,
                       "vacuous": b.vacuous, "kind": b.kind}
            else:
                comp = getattr(b, "gap_bits", None)
                row = {"bound": label, "value": b.bound_bits, "empirical": b.empirical_bits,
                       "complexity": b.complexity_bits if comp is None else comp,
                       "sampling": b.sampling_bits, "alpha": b.alpha, "vacuous": b.vacuous,
                       "kind": "high-probability"}
            out.append(row)
        return out

    def format_table(self) -> str:
        head = f"{'bound':<40} {'value':>10} {'empirical':>10} {'complexity':>11} {'sampling':>9} {'alpha':>7}  vacuous"
        lines = [head, "-" * len(head)]
        for r in self.rows():
            alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
            lines.append(
                f"{r['bound']:<40} {r['value']:>10.5f} {r['empirical']:>10.5f} "
                f"{r['complexity']:>11.5f} {r['sampling']:>9.5f} {alpha:>7}  {r['vacuous']}"
            )
        b = self.best
        lines.append("")
        lines.append(
            f"best: {b['bound_bits']:.5f} bits/token = {b['label']} (min over {len(b['among'])} "
            f"candidates, each at delta/{len(b['among'])} = {b['delta_each']:.4g})"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": {k: to_plain(v) for k, v in self.bounds.items()},
                "best": to_plain(self.best), "inputs": to_plain(self.inputs)}


def from_stats(
    loss_stats: Any,
    coded_bits: float,
    m: float,
    *,
    delta: float = 0.05,
    extra_bits: float = 0.0,
    vocab_size: int | None = None,
    full_pass: bool = False,
    topk: tuple[int, ...] = (1,),
    fixed_alpha: float | None = None,
    train_documents: float | None = None,
    num_parameters: float | None = None,
    bits_per_parameter: float = 16.0,
    unquantized_bits: float | None = None,
) -> BoundTable:
    """Compute every applicable bound from saved statistics.

    ``loss_stats``: LossStats / state dict / JSON path (s = its token count, sampled uniformly
    with replacement from the m training tokens unless ``full_pass``: all m tokens evaluated).
    ``coded_bits``: raw code length C of the model. Returns the official token bound
    (lotfi-code, Hoeffding), the union-cost token bound and the empirical Freedman bound with
    Hoeffding and empirical Bernstein sampling terms, top-k error bounds, the mutual-information
    bound in expectation at ``fixed_alpha`` (default: the largest level, chosen before seeing
    data), and, with ``train_documents`` (+ ``num_parameters``), the document-level and
    parameter-counting baselines (these use the per-token mean as the per-document mean:
    exact for equal-length documents, illustrative otherwise).
    """
    st = read_stats(loss_stats)
    d = check_delta(delta)
    coded = check_nonneg(coded_bits, "coded_bits")
    extra = check_nonneg(extra_bits, "extra_bits")
    m_val = check_count(m, "m")
    v = vocab_size if vocab_size is not None else st.vocab_size
    if v is None:
        raise ValueError("vocab_size is not in the statistics; pass vocab_size=...")
    if st.vocab_size is not None and vocab_size is not None and st.vocab_size != vocab_size:
        raise ValueError(f"vocab_size={vocab_size} differs from the statistics' {st.vocab_size}")
    if full_pass and st.count != m_val:
        raise ValueError(f"full_pass=True but the statistics hold {st.count} tokens, not m={m!r}")
    s = None if full_pass else st.count
    if s is not None and s > m_val:
        raise ValueError(f"the statistics hold {s} tokens, more than m={m!r} training tokens")
    emp, var = st.mean_bits, st.variance_bits
    common = {"coded_bits": coded, "train_tokens": m_val, "sample_tokens": s, "vocab_size": v,
              "extra_bits": extra}
    unsmoothed = st.nll_mean_bits if math.isfinite(st.nll_mean_bits) else None
    bounds: dict[str, Any] = {}

    def _token(dd: float, sampling: str, cost: str = "union"):
        return token_bound(emp, delta=dd, alpha_cost=cost, sampling=sampling, variance_bits=var, **common)

    def _freedman(dd: float, sampling: str):
        return freedman_bound(emp, variance_bits=var, delta=dd, sampling=sampling,
                              unsmoothed_bits=unsmoothed,
                              unquantized_bits=unquantized_bits if unsmoothed is not None else None,
                              **common)

    bounds["token, official (lotfi-code, Hoeffding)"] = _token(d, "hoeffding", "lotfi-code")
    candidates = {
        "token (union, Hoeffding)": lambda dd: _token(dd, "hoeffding"),
        "token (union, empirical Bernstein)": lambda dd: _token(dd, "bernstein"),
        "Freedman (union, Hoeffding)": lambda dd: _freedman(dd, "hoeffding"),
        "Freedman (union, empirical Bernstein)": lambda dd: _freedman(dd, "bernstein"),
    }
    for label, fn in candidates.items():
        bounds[label] = fn(d)
    for k in topk:
        if k in st.topk_correct:
            for kind in ("hoeffding", "bernstein"):
                bounds[f"top-{k} error ({kind})"] = topk_bound(
                    st.topk_error(k), coded_bits=coded, train_tokens=m_val, sample_tokens=s,
                    delta=d, extra_bits=extra, sampling=kind, k=k, vocab_size=v)
    a_fixed = float(fixed_alpha) if fixed_alpha is not None else max(st.alphas)
    if a_fixed not in emp:
        raise ValueError(f"fixed_alpha={fixed_alpha!r} is not one of the statistics' alphas {st.alphas}")
    bounds["mutual-information (expectation)"] = mutual_information_bound(
        emp[a_fixed], coded_bits=coded, train_points=m_val, extra_bits=extra, vocab_size=v,
        alpha=a_fixed)
    if train_documents is not None:
        docs = check_count(train_documents, "train_documents")
        bounds["document-level (illustrative)"] = document_bound(
            emp, coded_bits=coded, train_documents=docs, sample_documents=None, vocab_size=v,
            delta=d, extra_bits=extra)
        if num_parameters is not None:
            bounds["parameter-count (illustrative)"] = parameter_count_bound(
                emp[a_fixed], num_parameters=num_parameters, train_documents=docs,
                bits_per_parameter=bits_per_parameter, vocab_size=v, alpha=a_fixed, delta=d)
    k_cand = len(candidates)
    paid = {label: fn(d / k_cand) for label, fn in candidates.items()}
    label = min(paid, key=lambda lb: paid[lb].bound_bits)
    best = {"label": label, "bound_bits": paid[label].bound_bits, "alpha": paid[label].alpha,
            "among": list(candidates), "delta_each": d / k_cand,
            "paid": f"each of {k_cand} candidates run at delta/{k_cand}",
            "result": paid[label]}
    inputs = {"coded_bits": coded, "m": m_val, "s": s, "delta": d, "extra_bits": extra,
              "vocab_size": v, "full_pass": full_pass, "alphas": list(st.alphas),
              "train_documents": train_documents, "num_parameters": num_parameters,
              "bits_per_parameter": bits_per_parameter, "fixed_alpha": a_fixed,
              "unquantized_bits": unquantized_bits}
    return BoundTable(bounds=bounds, best=best, inputs=inputs)
