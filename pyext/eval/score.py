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

from collections.abc import Callable
from typing import Any

import numpy as np

from .data import TokenStreams
from .sample import ContextRule, Rows, UnitPlan, Units, rows_for_units
from .stats import EvalState, losses_to_numpy

__all__ = ["Scorer", "batch_slices"]


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
