"""Uniform token sampling from a token file, and evaluation of a model on the sample.

Token-level bound (Lotfi, Kuang et al. 2024, arXiv 2407.18158; ``spec/bounds.md`` section 3):
the data points are the m = n_tokens - 1 positions ``i = 1 .. n_tokens - 1`` of the training
token file. The empirical risk is estimated on s positions drawn **uniformly with replacement**
(numpy PCG64 seeded by ``seed``; the draw is recorded by its seed and a hash of the positions).

The context of position i is the up to ``context_length`` tokens preceding it, never crossing a
document boundary: it starts at ``max(i - context_length, j)`` where j is the last end-of-text
position before i (the EOT is kept: it is the beginning-of-document token). So the loss of a
sampled token is that of ``model(tokens[start:i])`` at its last position, predicting tokens[i].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np


def positions_digest(positions: np.ndarray, starts: np.ndarray) -> str:
    """sha256 of sampled positions and their context starts (little-endian int64)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(positions, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(starts, dtype="<i8").tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class TokenSample:
    """Sampled target positions and their context starts (``starts[k] <= positions[k] - 1``)."""

    positions: np.ndarray  # int64 [s]
    starts: np.ndarray  # int64 [s]
    seed: int
    n_tokens: int
    context_length: int
    eot_id: int | None

    def __len__(self) -> int:
        return int(self.positions.size)

    @property
    def context_lengths(self) -> np.ndarray:
        return self.positions - self.starts

    def split(self, k: int) -> tuple[TokenSample, TokenSample]:
        """The first ``k`` samples and the rest (same seed and population)."""
        def part(sl: slice) -> TokenSample:
            return TokenSample(self.positions[sl], self.starts[sl], self.seed, self.n_tokens,
                               self.context_length, self.eot_id)

        return part(slice(0, k)), part(slice(k, None))

    def digest(self) -> str:
        """sha256 of the positions and starts (records which tokens were evaluated)."""
        return positions_digest(self.positions, self.starts)

    def to_dict(self) -> dict[str, Any]:
        lengths = self.context_lengths
        return {
            "num_samples": len(self),
            "population_tokens": self.n_tokens - 1,
            "with_replacement": True,
            "seed": self.seed,
            "rng": "numpy.random.default_rng(seed) (PCG64), integers(1, n_tokens, size=s)",
            "context_length": self.context_length,
            "eot_id": self.eot_id,
            "mean_context_tokens": float(lengths.mean()) if lengths.size else 0.0,
            "positions_sha256": self.digest(),
        }


def boundary_starts(tokens: np.ndarray, positions: np.ndarray, context_length: int, eot_id: int | None) -> np.ndarray:
    """Context start of each position: ``max(i - context_length, last EOT position < i)``
    (0 when no EOT precedes i; no boundary handling when ``eot_id`` is None)."""
    positions = np.asarray(positions, dtype=np.int64)
    starts = np.maximum(positions - int(context_length), 0)
    if eot_id is None or positions.size == 0:
        return starts
    eot_pos = np.flatnonzero(np.asarray(tokens) == eot_id)
    k = np.searchsorted(eot_pos, positions, side="left") - 1  # last EOT strictly before i
    last = np.where(k >= 0, eot_pos[np.maximum(k, 0)], 0)
    return np.maximum(starts, last)


def sample_tokens(
    tokens: np.ndarray, num_samples: int, *, context_length: int, seed: int, eot_id: int | None = 0
) -> TokenSample:
    """Draw ``num_samples`` positions uniformly with replacement from ``1 .. len(tokens) - 1``."""
    n = int(len(tokens))
    if n < 2:
        raise ValueError(f"the token file needs at least 2 tokens to sample from, got {n}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    rng = np.random.default_rng(int(seed))
    positions = rng.integers(1, n, size=int(num_samples), dtype=np.int64)
    starts = boundary_starts(tokens, positions, context_length, eot_id)
    return TokenSample(positions, starts, int(seed), n, int(context_length), eot_id)


def iter_batches(tokens: np.ndarray, sample: TokenSample, batch_size: int, pad_id: int = 0):
    """Yield ``(order, inputs [B, L] int64, last [B] int64, targets [B] int64)`` over the sample.

    Samples are grouped by context length (longest first) to limit padding; inputs are
    right-padded, so with causal attention position ``last[b]`` never sees the padding.
    ``order`` gives the indices of the batch's samples in ``sample``.
    """
    import torch

    lengths = sample.context_lengths
    order_all = np.argsort(-lengths, kind="stable")
    for b0 in range(0, order_all.size, batch_size):
        order = order_all[b0 : b0 + batch_size]
        lens = lengths[order]
        width = int(lens.max())
        inputs = np.full((order.size, width), pad_id, dtype=np.int64)
        for r, k in enumerate(order):
            s, p = sample.starts[k], sample.positions[k]
            inputs[r, : p - s] = tokens[s:p]
        targets = np.asarray(tokens[sample.positions[order]], dtype=np.int64)
        yield (
            order,
            torch.from_numpy(inputs),
            torch.from_numpy(lens.astype(np.int64) - 1),
            torch.from_numpy(targets),
        )


def evaluate_sample(
    model,
    tokens: np.ndarray,
    sample: TokenSample,
    *,
    alphas=None,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "eval",
):
    """Smoothed losses of ``model`` (a :class:`tokenbounds.models.gpt.GPT`) on the sampled tokens.

    Runs the model body in float32, gathers the final hidden state at each sample's last context
    position and feeds it with the LM head weight to :func:`tokenbounds.linear_smoothed_nll` (no
    logits matrix). Returns a :class:`tokenbounds.LossStats`.
    """
    import torch

    from ..losses import DEFAULT_ALPHAS, LossStats
    from ..ops import linear_smoothed_nll

    alphas = tuple(DEFAULT_ALPHAS if alphas is None else alphas)
    vocab = int(model.config.vocab_size)
    stats = LossStats(alphas=alphas, vocab_size=vocab)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sample), desc=desc, unit="tok", dynamic_ncols=True, leave=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _, inputs, last, targets in iter_batches(tokens, sample, batch_size):
                hidden = model.hidden_states(inputs)
                h = hidden[torch.arange(inputs.shape[0]), last].float().contiguous()
                losses = linear_smoothed_nll(h, model.lm_head.weight, targets, alphas, vocab_size=vocab)
                stats.update(losses)
                if bar is not None:
                    bar.update(inputs.shape[0])
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return stats
