"""Code lengths: the prefix-free fix, the prior from a code, and the message length of a
quantized model (spec ``bounds.md`` section 2).

Two ways of counting the message length of an integer symbol stream are offered:

* ``mode="exact"`` (default) runs a real entropy coder (``constriction``'s range coder with the
  empirical categorical model) and counts the bits of the bitstream it emits (whole 32-bit words)
  plus the exact side information a decoder needs (see :func:`encode_symbols`). Decoding the
  bitstream gives back the same symbols (:func:`decode_symbols`).
* ``mode="lotfi-code"`` counts as the official token-bounds code does (Lotfi, Kuang et al. 2024,
  arXiv 2407.18158): ``ceil(n H2(p)) + 1`` bits for the symbols, ``16`` bits per fp16 codebook
  entry and ``L ceil(log2 n)`` bits for the level counts. Example: n = 50000 symbols over 11
  equiprobable levels -> 172973 + 176 + 176 = 173325 bits.

Only numpy and constriction are imported (no torch).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ._checks import check_nonneg

__all__ = [
    "EncodedSymbols",
    "MessageLength",
    "decode_symbols",
    "elias_gamma_bits",
    "encode_symbols",
    "log_prior_nats",
    "message_length_bits",
    "prefix_free_bits",
]

LN2 = math.log(2.0)


def prefix_free_bits(bits: float) -> float:
    """Length of a prefix-free version of a code of ``bits`` bits: ``C + 2 log2 C`` (0 for C = 0).

    The standard fix used by Lotfi et al. (2023, 2024) to turn a code length that is not
    self-delimiting into one that satisfies Kraft's inequality. For 0 < C < 1 the correction
    ``2 log2 C`` would be negative, so it is clipped at 0 there (C itself is then returned).
    """
    c = check_nonneg(bits, "bits")
    if c == 0.0:
        return 0.0
    return c + max(0.0, 2.0 * math.log2(c))


def log_prior_nats(coded_bits: float, extra_bits: float = 0.0) -> float:
    """``log 1/P(h) = (C + 2 log2 C + b_extra) ln 2`` nats for a model coded in ``C`` bits.

    ``extra_bits`` pays for choices made after seeing data (hyper-parameters, number of levels,
    the smoothing level, ...); spec section 2.
    """
    extra = check_nonneg(extra_bits, "extra_bits")
    return (prefix_free_bits(coded_bits) + extra) * LN2


def elias_gamma_bits(value: int) -> int:
    """Length of the Elias gamma code of an integer ``value >= 1``: ``2 floor(log2 v) + 1``."""
    v = int(value)
    if v < 1:
        raise ValueError(f"elias_gamma_bits needs value >= 1, got {value!r}")
    return 2 * (v.bit_length() - 1) + 1


def _uint_bits(max_value: int) -> int:
    """Bits of a fixed-width unsigned field able to hold 0..max_value."""
    return max(0, int(max_value)).bit_length()


@dataclass(frozen=True)
class MessageLength:
    """Length of the message that describes an integer symbol stream.

    ``total_bits = payload_bits + side_bits`` (everything a decoder needs, in bits).
    ``entropy_bits = n H2(p)`` with ``p`` the empirical level frequencies (the ideal payload).
    ``side`` itemises ``side_bits`` (header, alphabet, counts, codebook).
    """

    total_bits: float
    payload_bits: float
    side_bits: float
    entropy_bits: float
    num_symbols: int
    num_levels: int
    mode: str
    side: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EncodedSymbols:
    """A range-coded symbol stream plus the side information needed to decode it.

    ``words`` is the compressed bitstream (uint32 words, constriction ``RangeEncoder``);
    ``values`` the alphabet (sorted symbol values; ``values[i]`` is coded as index ``i``);
    ``counts`` how often each alphabet entry occurs (defines the empirical categorical model,
    rebuilt bit-identically by the decoder). ``dense`` is True when the alphabet is the implicit
    ``0..num_levels-1`` (then ``values`` need not be transmitted).
    """

    words: np.ndarray
    num_symbols: int
    values: np.ndarray
    counts: np.ndarray
    dense: bool

    @property
    def payload_bits(self) -> int:
        return 32 * int(self.words.size)


def _as_symbols(symbols: Any) -> np.ndarray:
    arr = np.asarray(symbols)
    if arr.ndim != 1:
        raise ValueError(f"symbols must be a 1-D integer array, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"symbols must have an integer dtype, got {arr.dtype}; round/quantize to level "
            "indices first"
        )
    if arr.min() < 0:
        raise ValueError("symbols must be non-negative integers (level indices)")
    return arr.astype(np.int64, copy=False)


def _alphabet(
    x: np.ndarray, num_levels: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Return (values, counts, indices, dense)."""
    if num_levels is not None:
        if isinstance(num_levels, bool) or int(num_levels) != num_levels or num_levels < 1:
            raise ValueError(f"num_levels must be a positive integer, got {num_levels!r}")
        num_levels = int(num_levels)
        if x.size and int(x.max()) >= num_levels:
            raise ValueError(
                f"symbol {int(x.max())} is out of range for num_levels={num_levels} "
                "(symbols must lie in 0..num_levels-1)"
            )
        counts = np.bincount(x, minlength=num_levels).astype(np.int64)
        return np.arange(num_levels, dtype=np.int64), counts, x, True
    if x.size and int(x.max()) - int(x.min()) <= max(1 << 16, x.size):
        # small value range: counting is O(n) where np.unique sorts (same values, counts, indices)
        lo = int(x.min())
        full = np.bincount(x - lo)
        present = np.flatnonzero(full)
        remap = np.zeros(full.size, dtype=np.int64)
        remap[present] = np.arange(present.size)
        return (present + lo).astype(np.int64), full[present].astype(np.int64), remap[x - lo], False
    values, indices, counts = np.unique(x, return_inverse=True, return_counts=True)
    return values.astype(np.int64), counts.astype(np.int64), indices.astype(np.int64), False


def _model(counts: np.ndarray):
    import constriction

    probs = counts.astype(np.float64) / float(counts.sum())
    return constriction.stream.model.Categorical(probs, perfect=False)


def encode_symbols(symbols: Any, *, num_levels: int | None = None) -> EncodedSymbols:
    """Range-code ``symbols`` (1-D non-negative ints) with their empirical categorical model.

    With ``num_levels`` the alphabet is ``0..num_levels-1``; otherwise it is the set of distinct
    values present. A stream with fewer than two distinct symbols needs no payload.
    """
    import constriction

    x = _as_symbols(symbols)
    values, counts, idx, dense = _alphabet(x, num_levels)
    words = np.zeros(0, dtype=np.uint32)
    if np.count_nonzero(counts) >= 2:
        if counts.size >= 2**24:
            raise ValueError("alphabet too large for the range coder (>= 2**24 levels)")
        enc = constriction.stream.queue.RangeEncoder()
        enc.encode(idx.astype(np.int32), _model(counts))
        words = np.asarray(enc.get_compressed(), dtype=np.uint32)
    return EncodedSymbols(
        words=words, num_symbols=int(x.size), values=values, counts=counts, dense=dense
    )


def decode_symbols(encoded: EncodedSymbols) -> np.ndarray:
    """Invert :func:`encode_symbols`: return the original symbols as an int64 array."""
    import constriction

    n = int(encoded.num_symbols)
    counts = np.asarray(encoded.counts, dtype=np.int64)
    values = np.asarray(encoded.values, dtype=np.int64)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    nz = np.flatnonzero(counts)
    if nz.size == 1:
        return np.full(n, values[nz[0]], dtype=np.int64)
    dec = constriction.stream.queue.RangeDecoder(np.asarray(encoded.words, dtype=np.uint32))
    idx = np.asarray(dec.decode(_model(counts), n), dtype=np.int64)
    return values[idx]


def _entropy_bits(counts: np.ndarray) -> float:
    n = float(counts.sum())
    if n == 0:
        return 0.0
    c = counts[counts > 0].astype(np.float64)
    return max(0.0, float(-(c * np.log2(c / n)).sum()))


def message_length_bits(
    symbols: Any,
    *,
    mode: str = "exact",
    num_levels: int | None = None,
    codebook_bits_per_entry: float = 16,
) -> MessageLength:
    """Bits needed to describe ``symbols`` (1-D non-negative ints, e.g. quantization levels).

    ``mode="exact"``: payload = the range coder's bitstream (``32 * words``); side information =
    Elias-gamma header for ``n + 1`` and ``L`` (levels), without ``num_levels`` the alphabet (1 flag bit when
    it is ``0..L-1``, else also the Elias-gamma width ``w`` of the largest value and ``L`` fields
    of ``w`` bits), ``L - 1`` level counts of ``ceil(log2(n + 1))`` bits each (the last one is implied by
    ``n``), and ``L * codebook_bits_per_entry`` bits for the codebook (the centroid values; pass 0
    if the caller pays for the codebook elsewhere).

    ``mode="lotfi-code"``: the official count, ``ceil(n H2(p)) + 1 + L codebook_bits_per_entry +
    L ceil(log2 n)`` (the official code runs a real arithmetic coder for n <= 1e4; we always use
    the entropy estimate there, which differs from it by at most a few bits).

    ``L`` is ``num_levels`` when given, else the number of distinct values present.
    """
    if mode not in ("exact", "lotfi-code"):
        raise ValueError(f"mode must be 'exact' or 'lotfi-code', got {mode!r}")
    cb = check_nonneg(codebook_bits_per_entry, "codebook_bits_per_entry")
    x = _as_symbols(symbols)
    n = int(x.size)
    values, counts, _, dense = _alphabet(x, num_levels)
    num_lv = int(counts.size)
    entropy = _entropy_bits(counts)

    if mode == "lotfi-code":
        payload = float(math.ceil(entropy - 1e-12 * max(1.0, entropy)) + 1) if n else 0.0
        counts_bits = float(num_lv * math.ceil(math.log2(n))) if n > 1 else 0.0
        side = {"codebook_bits": num_lv * cb, "counts_bits": counts_bits}
    else:
        enc = encode_symbols(x, num_levels=num_levels)
        payload = float(enc.payload_bits)
        side = {
            "header_bits": float(elias_gamma_bits(n + 1) + elias_gamma_bits(max(num_lv, 1))),
            "alphabet_bits": 0.0,
            "counts_bits": float(max(num_lv - 1, 0) * _uint_bits(n)),
            "codebook_bits": num_lv * cb,
        }
        if not dense and num_lv:
            # 1 flag bit: "the alphabet is 0..L-1"; otherwise the sorted values follow.
            side["alphabet_bits"] = 1.0
            if not np.array_equal(values, np.arange(num_lv)):
                width = _uint_bits(int(values.max()))
                side["alphabet_bits"] += float(elias_gamma_bits(width + 1) + num_lv * width)
    side_bits = float(sum(side.values()))
    return MessageLength(
        total_bits=payload + side_bits,
        payload_bits=payload,
        side_bits=side_bits,
        entropy_bits=entropy,
        num_symbols=n,
        num_levels=num_lv,
        mode=mode,
        side=side,
    )
