"""The batch loop: units -> model rows -> final hidden states -> the scored positions -> the
fused head, all scored positions of a batch at once.

For a batch of B units (:func:`~tokenbounds.eval.sample.rows_for_units`): the rows
``[prefix] + x[start:end]`` are right-padded to the longest (causal attention: a position never
sees the padding after it, so no attention mask is needed), run through the model body to the
final hidden states [B, L, D], and the hidden state of every scored target's predecessor is
gathered into one [N, D] matrix (N = B S for full windows) that goes with the LM head weight to
:func:`tokenbounds.linear_smoothed_nll`: every smoothing level, the unsmoothed loss and the rank
in one pass over vocabulary tiles, never the N x V logits. The statistics of the batch are added
to an :class:`~tokenbounds.eval.stats.EvalState`.

``evaluate`` and the demo pipeline both score through :class:`Scorer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import TokenStreams
from .sample import ContextRule, Rows, UnitPlan, Units, rows_for_units
from .stats import EvalState, losses_to_numpy

__all__ = ["Scored", "Scorer", "batch_slices", "score_plan", "score_tokens", "stats_document"]


def batch_slices(num_units: int, batch_size: int) -> list[slice]:
    """The plan's units cut into consecutive batches of ``batch_size`` (the last may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    return [slice(i, min(i + batch_size, num_units)) for i in range(0, num_units, batch_size)]


class Scorer:
    """Scores units of token streams with a :class:`~tokenbounds.eval.hf.FusedHead`.

    ``track_units``: also accumulate :class:`tokenbounds.UnitStats` (window-unit sampled mode)."""

    def __init__(self, head, streams: TokenStreams, units: Units, rule: ContextRule, alphas, *,
                 device: Any = "cpu", track_units: bool = False, pad_id: int = 0):
        self.head = head
        self.streams = streams
        self.units = units
        self.rule = rule
        self.alphas = tuple(float(a) for a in alphas)
        self.device = device
        self.track_units = track_units
        self.pad_id = int(pad_id)
        self.vocab_size = int(head.vocab_size)

    def empty_state(self) -> EvalState:
        return EvalState.empty(self.alphas, self.vocab_size, self.rule.window, track_units=self.track_units)

    def inputs(self, rows: Rows) -> np.ndarray:
        """[R, L] int64 model inputs (right-padded with ``pad_id``)."""
        pfx = int(self.rule.prefix_token is not None)
        lengths = rows.end - rows.start
        width = int(lengths.max()) + pfx
        out = np.full((lengths.size, width), self.pad_id, dtype=np.int64)
        if pfx:
            out[:, 0] = int(self.rule.prefix_token)
        files = self.streams.files
        if lengths.size and np.all(lengths == lengths[0]) and np.all(rows.file == rows.file[0]):
            idx = rows.start[:, None] + np.arange(int(lengths[0]))
            out[:, pfx:] = np.asarray(files[int(rows.file[0])][idx.reshape(-1)], dtype=np.int64).reshape(idx.shape)
            return out
        for r in range(lengths.size):
            out[r, pfx : pfx + lengths[r]] = files[int(rows.file[r])][int(rows.start[r]) : int(rows.end[r])]
        return out

    def targets(self, rows: Rows) -> dict[str, np.ndarray]:
        """Per scored target: its row, its column in the padded inputs (the predecessor's), its
        position, token id, context length (data tokens before it) and unit (batch index)."""
        n = rows.last - rows.first + 1
        row = np.repeat(np.arange(n.size, dtype=np.int64), n)
        offsets = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
        k = rows.first[row] + (np.arange(int(n.sum()), dtype=np.int64) - offsets[row])
        col = k - 1 - rows.start[row] + int(self.rule.prefix_token is not None)
        ids = np.empty(k.size, dtype=np.int64)
        for f in np.unique(rows.file):
            sel = rows.file[row] == f
            ids[sel] = np.asarray(self.streams.files[int(f)][k[sel]], dtype=np.int64)
        return {"row": row, "col": col, "position": k, "token": ids, "context": k - rows.start[row],
                "unit": rows.unit[row]}

    def batch_losses(self, batch_units: np.ndarray):
        """Score one batch of units: (its targets as :meth:`targets` gives them, numpy
        :class:`tokenbounds.TokenLosses` of those targets in the same order)."""
        import torch

        rows = rows_for_units(self.units, self.rule, np.asarray(batch_units, dtype=np.int64))
        inp = torch.from_numpy(self.inputs(rows)).to(self.device)
        tg = self.targets(rows)
        tg["file"] = rows.file[tg["row"]]
        with torch.no_grad():
            hidden = self.head.hidden_states(inp)
            flat = torch.from_numpy(tg["row"] * inp.shape[1] + tg["col"]).to(self.device)
            h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)
            losses = self.head.losses(h, torch.from_numpy(tg["token"]).to(self.device), self.alphas)
        return tg, losses_to_numpy(losses)

    def batch(self, batch_units: np.ndarray, weights: np.ndarray, state: EvalState) -> int:
        """Score one batch of units (drawn ``weights`` times each) into ``state``; returns the
        number of targets scored."""
        tg, losses = self.batch_losses(batch_units)
        state.update(losses, tg["context"], tg["unit"], np.asarray(weights, dtype=np.int64))
        return int(tg["token"].size)

    def score(self, plan: UnitPlan, batch_size: int, *, state: EvalState | None = None,
              progress: Callable[[int], None] | None = None) -> EvalState:
        """Score every unit of ``plan`` in batches of ``batch_size`` units (one process, no
        checkpoints: the demo's loop; ``evaluate`` runs the same batches in resumable blocks)."""
        state = self.empty_state() if state is None else state
        for sl in batch_slices(plan.units.size, batch_size):
            n = self.batch(plan.units[sl], plan.weights[sl], state)
            if progress is not None:
                progress(n)
        return state


def score_plan(model_or_head, streams: TokenStreams, units: Units, rule: ContextRule, plan: UnitPlan, *,
               alphas=None, batch_size: int = 16, device: Any = "cpu", progress: bool = False,
               desc: str = "score") -> EvalState:
    """Score ``plan`` in this process (no checkpoints) with a tqdm bar when ``progress``: the loop
    of the demo and of every in-process caller; ``tokenbounds evaluate`` runs the same batches in
    resumable, sharded blocks. ``model_or_head``: a causal LM or a FusedHead."""
    from ..losses import DEFAULT_ALPHAS
    from .hf import FusedHead

    head = model_or_head if isinstance(model_or_head, FusedHead) else FusedHead(model_or_head)
    scorer = Scorer(head, streams, units, rule, DEFAULT_ALPHAS if alphas is None else alphas, device=device,
                    track_units=not plan.full_pass)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.scored_tokens, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True, leave=False)
    try:
        return scorer.score(plan, batch_size, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


def stats_document(state: EvalState, rule: ContextRule, plan: UnitPlan, *, coded_bits: float, delta: float = 0.05,
                   extra_bits: float = 0.0, description: str = "", parts: dict[str, float] | None = None
                   ) -> dict[str, Any]:
    """A statistics document in the layout of ``tokenbounds evaluate``'s stats.json (format
    tokenbounds.evaluate/2: the LossStats state, ``unit_stats`` for a window-unit sample, and the
    evaluation's m, scoring and C), which ``tokenbounds.bounds.from_stats`` and
    ``tokenbounds bound --stats FILE`` read with the right sampling design."""
    from .evaluation import STATS_FORMAT

    doc: dict[str, Any] = dict(state.stats.state_dict())
    if state.units is not None:
        doc["unit_stats"] = state.units.state_dict()
    doc["evaluation"] = {
        "format": STATS_FORMAT, "m": int(plan.m), "delta": float(delta), "extra_bits": float(extra_bits),
        "vocab_size": int(state.stats.vocab_size),
        "coded": {"coded_bits": float(coded_bits), "description": description, "parts": dict(parts or {})},
        "scoring": {**rule.to_dict(), "units": plan.num_units, "draws": plan.draws, "full_pass": plan.full_pass,
                    "units_scored": int(plan.units.size), "scored_tokens": plan.scored_tokens,
                    "units_sha256": plan.digest(), "seed": plan.seed},
        "by_context_length": state.by_context_length(), "histogram": state.histogram_dict(),
    }
    return doc


@dataclass(frozen=True)
class Scored:
    """What :func:`score_tokens` returns: the statistics and the rule and plan that produced them."""

    state: EvalState
    rule: ContextRule
    plan: UnitPlan

    @property
    def stats(self):
        """The per-token :class:`tokenbounds.LossStats` (with multiplicity for a unit sample)."""
        return self.state.stats

    def document(self, coded_bits: float, *, delta: float = 0.05, extra_bits: float = 0.0,
                 description: str = "", parts: dict[str, float] | None = None) -> dict[str, Any]:
        """:func:`stats_document` of this result, for ``tokenbounds.bounds.from_stats``."""
        return stats_document(self.state, self.rule, self.plan, coded_bits=coded_bits, delta=delta,
                              extra_bits=extra_bits, description=description, parts=parts)


def score_tokens(model, tokens: np.ndarray | Sequence[np.ndarray], *, window: int, stride: int | None = None,
                 sample_tokens: int | None = None, seed: int = 0, prefix_token: int | None = None,
                 eot_id: int | None = None, reset_at_eot: bool = False, alphas=None, batch_size: int = 16,
                 device: Any = "cpu", progress: bool = False, desc: str = "score") -> Scored:
    """Score ``model`` (our GPT or a Hugging Face causal LM) on token arrays with the window rule
    of ``tokenbounds evaluate`` (window T, stride S, default T / 2; ``docs/evaluation.md``): a full
    pass over every data point (``sample_tokens=None``; no sampling term) or the window units of
    ``sample_tokens`` uniform draws (seed ``seed``). The in-process entry point of the engine for
    experiments (compression, scaling, length generalisation); returns :class:`Scored`."""
    from .sample import plan_units

    files = [np.asarray(tokens)] if isinstance(tokens, np.ndarray) else [np.asarray(t) for t in tokens]
    stride = max(1, int(window) // 2) if stride is None else int(stride)
    rule = ContextRule("windows", int(window), stride, prefix_token, reset_at_eot, eot_id)
    streams = TokenStreams(files, eot_id)
    units = Units(streams, stride)
    plan = plan_units(units, rule, sample_tokens=sample_tokens, seed=seed)
    state = score_plan(model, streams, units, rule, plan, alphas=alphas, batch_size=batch_size, device=device,
                       progress=progress, desc=desc)
    return Scored(state, rule, plan)
