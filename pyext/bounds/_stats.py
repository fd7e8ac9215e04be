"""Decoding and validating the statistics states (the one parser behind
:func:`~tokenbounds.bounds.read_stats` and the window-unit Freedman bound): the formats belong to
``LossStats`` / ``UnitStats`` (``tokenbounds.losses``, numpy only), whose ``from_state_dict``
decode them; this module rejects what would make a bound wrong (NaN, negative counts, shapes)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["LOSS_FORMAT", "UNIT_FORMAT", "decode_loss_stats", "decode_unit_stats"]

LOSS_FORMAT = "tokenbounds.LossStats/1"
UNIT_FORMAT = "tokenbounds.UnitStats/1"


def decode_loss_stats(state: dict[str, Any]):
    """A validated LossStats from its state (any ``format`` key: the caller checked it)."""
    from ..losses import LossStats

    try:
        st = LossStats.from_state_dict({**state, "format": LOSS_FORMAT})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed LossStats state: {exc!r}") from None
    if st.count < 0:
        raise ValueError(f"LossStats count must be a non-negative integer, got {state.get('count')!r}")
    if st.count < 2:
        raise ValueError(f"LossStats holds {st.count} tokens; at least 2 are needed for a bound")
    a = len(st.alphas)
    if st.mean.shape != (a,) or st.m2.shape != (a,):
        raise ValueError("LossStats mean/m2 must have one entry per alpha")
    if not (all(math.isfinite(x) for x in st.mean) and all(math.isfinite(x) for x in st.m2)):
        raise ValueError("LossStats mean/m2 contain NaN or inf; the evaluation produced bad losses")
    if any(x < 0 for x in st.m2):
        raise ValueError("LossStats m2 (sum of squared deviations) is negative")
    for k, v in st.topk_correct.items():
        if v < 0 or v > st.count:
            raise ValueError(f"LossStats topk_correct[{k}]={v!r} must be an integer in [0, count]")
    return st


def decode_unit_stats(state: Any):
    """A validated UnitStats from the object or its state dict."""
    from ..losses import UnitStats

    if isinstance(state, UnitStats):
        st = state
    elif isinstance(state, Mapping):
        try:
            st = UnitStats.from_state_dict(dict(state))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed UnitStats state: {exc!r}") from None
    else:
        raise ValueError(f"unit statistics must be a UnitStats or its state dict, got {type(state).__name__}")
    if st.draws < 2:
        raise ValueError(f"UnitStats holds {st.draws} draws; at least 2 are needed for a bound")
    if st.tokens < st.draws:
        raise ValueError(f"UnitStats holds {st.tokens} tokens for {st.draws} draws (each draw is >= 1 token)")
    arrays = [getattr(st, name) for name in st._ARRAYS]
    if any(arr.shape != (len(st.alphas),) for arr in arrays):
        raise ValueError("UnitStats sums must have one entry per alpha")
    if not all(math.isfinite(x) for arr in arrays for x in arr):
        raise ValueError("UnitStats sums contain NaN or inf; the evaluation produced bad losses")
    return st
