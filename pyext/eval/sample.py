"""Which tokens the model reads before each target (the context rule), window units, the draws
of a sampled evaluation, and their digests (``spec/bounds.md`` sections 3 and 3b).

**The data points.** In each data file (a stream x_0..x_{n-1}) the targets are the positions
k = 1..n-1 (each has a token before it); several files give m = sum_f (n_f - 1) data points and no
context ever crosses a file (:class:`~tokenbounds.eval.data.TokenStreams`).

**Window context rule.** Fix a window T (at most the model's context) and a stride S <= T.
Unit u of a file scores the targets k in (uS, (u+1)S] within [1, n-1]; the model reads the up-to-T
tokens x[max(0, l - T) : l] that end just before the unit's last target l, and each target k of
the unit is scored from the hidden state at x_{k-1}. Since l - uS <= S <= T the window covers
every target's predecessor, and target k sees k - max(0, l - T) >= T - S + 1 tokens (fewer only
near the start of a file). The context of k is a fixed function of its position and the tokens
before it, so R(h) = (1/m) sum_k E[l(X_k) | x_<k] under this rule is a risk of the same form as
the paper's and the token-level (Azuma) and Freedman bounds apply to it unchanged. This is the
rolling-window scheme of lm-evaluation-harness (``get_rolling_token_windows``): with S dividing T,
its windows over x_1.. (prefix x_0, ``max_seq_len`` T, ``context_len`` T - S + 1) give every target
the same context as ours (``tests/test_windows.py`` checks it position by position).

**Prefix token.** Models trained with a BOS token predict badly from a context that starts
mid-text without one. With ``prefix_token`` set, every window (and every per-token context) is
``[prefix] + x[a:l]``: still a fixed function of the position and the past, so nothing in the
bounds changes; the token is recorded in the configuration. ``auto`` uses the tokenizer's BOS when
it defines one. The model then reads up to T + 1 tokens, which must fit its context.

**End-of-text.** Contexts may cross end-of-text tokens (still a function of the past). With
``reset_at_eot`` each target's context starts instead at the last end-of-text token before it
(kept: in our files it opens the next document, ``EOT d1 EOT d2 ... EOT``): a window is split at
its end-of-text tokens into segments, each run as its own sequence (no attention mask needed).

**Per-token contexts** (the paper's rule, ``mode="per-token"``) are the same rule with S = 1: unit
u is the single target u + 1, read from the up-to-T tokens before it. One forward pass per scored
token, for comparison and reproduction.

**Window units as the sample (cluster sampling).** Draw J_1..J_s i.i.d. uniform on the m data
points (``numpy.random.default_rng(seed).integers(0, m, s)``) and let Y_i be the mean loss of the
unit containing J_i. A unit of n_u targets is drawn with probability n_u / m, so
E[Y_i] = sum_u (n_u/m)(1/n_u) sum_{k in u} l_k = Rhat_m: the Y_i are i.i.d. in the loss interval
and Hoeffding / empirical Bernstein bound Rhat_m - mean(Y) with s = the number of draws; the
Freedman proxy likewise uses the unit means of ((X - c)/Delta)^2 (``tokenbounds.UnitStats``). A
unit drawn r times is scored once and counted r times (``UnitPlan.weights``). Treating the
s * n_u drawn tokens as independent would *not* be valid.

**Full pass.** Every unit once: the empirical loss and the Freedman S are exact over the m
tokens and there is no sampling term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import TokenStreams
from .fileio import arrays_sha256

__all__ = [
    "MODES",
    "ContextRule",
    "Rows",
    "UnitPlan",
    "Units",
    "draw_points",
    "plan_units",
    "positions_digest",
    "rows_for_units",
]

MODES = ("windows", "per-token")


def positions_digest(*arrays: np.ndarray) -> str:
    """sha256 of int64 arrays (little-endian, in order): records which tokens were evaluated."""
    return arrays_sha256(*arrays)


@dataclass(frozen=True)
class ContextRule:
    """The context rule of an evaluation (see the module docstring).

    ``window`` T: data tokens the model reads at most; ``stride`` S (1 in per-token mode);
    ``prefix_token``: an id prepended to every window, or None; ``reset_at_eot``: contexts start
    at the last end-of-text token (``eot_id``) before the target."""

    mode: str
    window: int
    stride: int
    prefix_token: int | None = None
    reset_at_eot: bool = False
    eot_id: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if int(self.window) < 1:
            raise ValueError(f"--window must be >= 1, got {self.window}")
        if self.mode == "windows" and not 1 <= int(self.stride) <= int(self.window):
            raise ValueError(f"--stride must lie in [1, --window = {self.window}], got {self.stride} "
                             "(each window scores its last S targets and must contain their predecessors)")
        if self.mode == "per-token" and self.stride != 1:
            raise ValueError("per-token contexts score one target per forward pass (stride 1)")
        if self.reset_at_eot and self.eot_id is None:
            raise ValueError("--reset-at-eot needs an end-of-text id (--eot-id)")

    @property
    def model_tokens(self) -> int:
        """The most tokens the model reads in one sequence (window + prefix)."""
        return int(self.window) + (self.prefix_token is not None)

    def check_model_context(self, model_context: int | None) -> None:
        if model_context is not None and self.model_tokens > model_context:
            extra = " plus the prefix token" if self.prefix_token is not None else ""
            raise ValueError(
                f"--window {self.window}{extra} = {self.model_tokens} tokens exceeds the model's context of "
                f"{model_context}; use --window {model_context - (self.prefix_token is not None)} or less"
                + (" (or --prefix-token none)" if self.prefix_token is not None else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "window": int(self.window), "stride": int(self.stride),
                "prefix_token": self.prefix_token, "reset_at_eot": bool(self.reset_at_eot),
                "eot_id": self.eot_id}


class Units:
    """The window units of a set of token files: unit u of file f scores the targets
    (uS, min((u+1)S, n_f - 1)]; units are numbered globally in file order."""

    def __init__(self, streams: TokenStreams, stride: int):
        self.streams = streams
        self.stride = int(stride)
        per_file = -(-(streams.sizes - 1) // self.stride)
        self.unit_offsets = np.concatenate([[0], np.cumsum(per_file)]).astype(np.int64)

    @property
    def num_units(self) -> int:
        return int(self.unit_offsets[-1])

    def of_points(self, points: np.ndarray) -> np.ndarray:
        """The unit of each data point (global indices in [0, m))."""
        f, k = self.streams.locate(points)
        return self.unit_offsets[f] + (k - 1) // self.stride

    def locate(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file, first target, last target) of each unit: its targets are first..last."""
        units = np.asarray(units, dtype=np.int64)
        f = np.searchsorted(self.unit_offsets, units, side="right") - 1
        local = units - self.unit_offsets[f]
        first = local * self.stride + 1
        last = np.minimum((local + 1) * self.stride, self.streams.sizes[f] - 1)
        return f, first, last

    def sizes(self, units: np.ndarray) -> np.ndarray:
        _, first, last = self.locate(units)
        return last - first + 1


def draw_points(m: int, s: int, seed: int) -> np.ndarray:
    """s data points uniform with replacement on [0, m): ``default_rng(seed).integers(0, m, s)``."""
    if s < 1:
        raise ValueError(f"--sample-tokens must be >= 1, got {s}")
    return np.random.default_rng(int(seed)).integers(0, int(m), size=int(s), dtype=np.int64)


@dataclass(frozen=True)
class UnitPlan:
    """The units an evaluation scores, in scoring order, and how often each was drawn.

    ``weights[i]``: draws of ``units[i]`` (1 for every unit in a full pass); ``draws``: s, the
    number of draws (None in a full pass); ``scored_tokens``: targets of the scored units;
    ``weighted_tokens``: the same counted with multiplicity (the per-token statistics' count)."""

    units: np.ndarray
    weights: np.ndarray
    full_pass: bool
    draws: int | None
    seed: int | None
    num_units: int
    m: int
    scored_tokens: int
    weighted_tokens: int
    draws_sha256: str | None

    def digest(self) -> str:
        """sha256 of the units and their weights in scoring order."""
        return positions_digest(self.units, self.weights)

    def to_dict(self) -> dict[str, Any]:
        return {"full_pass": self.full_pass, "draws": self.draws, "seed": self.seed,
                "units_total": self.num_units, "units_scored": int(self.units.size), "m": self.m,
                "scored_tokens": self.scored_tokens,
                "scored_tokens_with_multiplicity": self.weighted_tokens,
                "rng": None if self.full_pass else
                "numpy.random.default_rng(seed) (PCG64).integers(0, m, size=s) -> data point -> its unit",
                "draws_sha256": self.draws_sha256, "units_sha256": self.digest()}


def plan_units(units: Units, rule: ContextRule, *, sample_tokens: int | None, seed: int) -> UnitPlan:
    """Every unit once (``sample_tokens=None``: a full pass) or the units of s drawn data points
    (each once, weighted by its draws), ordered by window length, longest first (less padding),
    then by unit id: a fixed order, so blocks of the plan are the same in every run."""
    m = units.streams.num_points
    if sample_tokens is None:
        ids = np.arange(units.num_units, dtype=np.int64)
        weights = np.ones(ids.size, dtype=np.int64)
        draws_sha = None
    else:
        points = draw_points(m, sample_tokens, seed)
        ids, weights = np.unique(units.of_points(points), return_counts=True)
        weights = weights.astype(np.int64)
        draws_sha = positions_digest(points)
    _, first, last = units.locate(ids)
    length = last - np.maximum(last - rule.window, 0)
    order = np.lexsort((ids, -length))
    ids, weights = ids[order], weights[order]
    sizes = (last - first + 1)[order]
    sampled = sample_tokens is not None
    return UnitPlan(ids, weights, not sampled, int(sample_tokens) if sampled else None,
                    int(seed) if sampled else None, units.num_units, m, int(sizes.sum()),
                    int((sizes * weights).sum()), draws_sha)


@dataclass(frozen=True)
class Rows:
    """The model inputs that score a batch of units.

    Row r reads ``[prefix] + x_f[start[r] : end[r]]`` of file ``file[r]`` and scores the targets
    ``first[r]..last[r]`` (each from the hidden state of its predecessor); ``unit[r]`` is the
    row's unit, as an index into the batch. Without ``reset_at_eot`` there is one row per unit."""

    file: np.ndarray
    start: np.ndarray
    end: np.ndarray
    first: np.ndarray
    last: np.ndarray
    unit: np.ndarray

    @property
    def num_targets(self) -> int:
        return int((self.last - self.first + 1).sum())


def rows_for_units(units: Units, rule: ContextRule, batch_units: np.ndarray) -> Rows:
    """The rows that score ``batch_units`` under ``rule`` (see :class:`Rows`)."""
    f, first, last = units.locate(batch_units)
    start = np.maximum(last - int(rule.window), 0)
    local = np.arange(batch_units.size, dtype=np.int64)
    if not rule.reset_at_eot:
        return Rows(f, start, last.copy(), first, last, local)
    cols: list[list[int]] = [[], [], [], [], [], []]
    streams = units.streams
    for i in range(batch_units.size):
        fi, a, b, t0, t1 = int(f[i]), int(start[i]), int(last[i]), int(first[i]), int(last[i])
        e = streams.eots(fi)
        inner = e[np.searchsorted(e, a, side="right") : np.searchsorted(e, b, side="left")]
        bounds = [a, *inner.tolist(), b]
        for s0, s1 in zip(bounds[:-1], bounds[1:], strict=True):
            lo, hi = max(t0, s0 + 1), min(t1, s1)  # targets k with k - 1 in [s0, s1)
            if lo <= hi:
                for col, v in zip(cols, (fi, s0, s1, lo, hi, i), strict=True):
                    col.append(v)
    arrays = [np.array(c, dtype=np.int64) for c in cols]
    return Rows(*arrays)
