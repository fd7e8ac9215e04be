"""Synthetic tasks for length generalization (seed 000's table, after Huang et al., ICLR 2025):
copy, parity, addition and retrieval, each with a known answer.

A task of *size* n (the number of symbols to copy, bits, digits per operand, key-value pairs)
is one token sequence; its **answer tokens** are the positions a model must predict and is scored
on. Sequences are next-token data: the model reads ``tokens[:, :p]`` and is scored on
``tokens[:, p]`` where ``answer_mask[:, p]`` is True. Token 0 is padding in every task (batches of
mixed sizes are right-padded, which a causal model never sees from earlier positions).

Layouts (n = size):

* copy:      BOS x_1 .. x_n SEP x_1 .. x_n                 answers: the second x_1 .. x_n
* parity:    BOS b_1 .. b_n SEP p,  p = sum(b) mod 2       answer: p
* addition:  BOS a_0 .. a_{n-1} + b_0 .. b_{n-1} = c_0 .. c_n, digits least significant first
             (the order in which a causal model can carry), c = a + b      answers: c's n + 1 digits
* retrieval: BOS x_1 .. x_{j-1} KEY x_j .. x_n SEP KEY x_j: n random values with one KEY
             inserted at a uniform place; the query KEY asks for the token after it   answer: x_j
             (Associative recall over many distinct keys, k_1 v_1 .. k_n v_n SEP k_q -> v_q, was not
             learned by these small models within the 2-minute training budget: with 4 pairs and
             16 keys, after 3000 steps they still only eliminated already-answered values.)

Batches are a function of (task, sizes, seed) only.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAD, BOS, SEP = 0, 1, 2


@dataclass(frozen=True)
class TaskBatch:
    """``tokens`` [B, S] int64 (right-padded with 0), ``answer_mask`` [B, S] bool (True where
    ``tokens[b, p]`` is an answer token, predicted from ``tokens[b, :p]``), ``sizes`` [B]."""

    tokens: np.ndarray
    answer_mask: np.ndarray
    sizes: np.ndarray

    def inputs_targets(self):
        """Torch (inputs, targets) [B, S-1] for ``GPT.forward``: targets are the next tokens,
        -100 (ignored) everywhere but at answer tokens."""
        import torch

        x = torch.from_numpy(self.tokens[:, :-1].copy())
        y = torch.from_numpy(np.where(self.answer_mask[:, 1:], self.tokens[:, 1:], -100))
        return x, y

    @property
    def answers(self) -> list[np.ndarray]:
        """The answer tokens of each sequence, in order."""
        return [row[mask] for row, mask in zip(self.tokens, self.answer_mask, strict=True)]


class Task:
    """One synthetic task; subclasses define the vocabulary, the layout and ``_example``."""

    name: str = ""
    vocab_size: int = 0

    def sequence_length(self, n: int) -> int:
        """Tokens in one sequence of size n."""
        raise NotImplementedError

    def _example(self, n: int, rng: np.random.Generator) -> tuple[list[int], range]:
        """(tokens, indices of the answer tokens) of one size-n instance."""
        raise NotImplementedError

    def check_size(self, n) -> int:
        if isinstance(n, bool) or int(n) != n:
            raise ValueError(f"{self.name}: task sizes must be integers, got {n!r}")
        if n < 1:
            raise ValueError(f"{self.name}: task size must be >= 1 (symbols, bits, digits or pairs), got {n}")
        return int(n)

    def batch(self, sizes: int | Sequence[int] | np.ndarray, seed: int | Sequence[int], count: int | None = None) -> TaskBatch:
        """Sequences of the given sizes (or ``count`` sequences of one size), deterministic in
        ``seed`` (an int or a sequence of ints, as numpy's ``default_rng`` takes)."""
        if np.ndim(sizes) == 0:
            sizes = [sizes] * (1 if count is None else int(count))
        elif count is not None:
            raise ValueError("pass count only with a single size")
        sizes = [self.check_size(n) for n in np.asarray(sizes).tolist()]
        if not sizes:
            raise ValueError(f"{self.name}: no sizes given")
        salt = zlib.crc32(self.name.encode())  # different tasks draw different streams
        rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), salt])
        width = max(self.sequence_length(n) for n in sizes)
        tokens = np.full((len(sizes), width), PAD, dtype=np.int64)
        mask = np.zeros((len(sizes), width), dtype=bool)
        for b, n in enumerate(sizes):
            seq, answer_idx = self._example(n, rng)
            tokens[b, : len(seq)] = seq
            mask[b, answer_idx] = True
        return TaskBatch(tokens, mask, np.asarray(sizes, dtype=np.int64))

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size}


class Copy(Task):
    name = "copy"

    def __init__(self, num_symbols: int = 16):
        if num_symbols < 2:
            raise ValueError(f"copy needs num_symbols >= 2, got {num_symbols}")
        self.num_symbols = int(num_symbols)
        self.vocab_size = 3 + self.num_symbols

    def sequence_length(self, n: int) -> int:
        return 2 * n + 2

    def _example(self, n, rng):
        x = (3 + rng.integers(0, self.num_symbols, size=n)).tolist()
        return [BOS, *x, SEP, *x], range(n + 2, 2 * n + 2)

    def describe(self) -> dict:
        return {**super().describe(), "num_symbols": self.num_symbols}


class Parity(Task):
    name = "parity"
    vocab_size = 5  # PAD BOS SEP 0 1

    def sequence_length(self, n: int) -> int:
        return n + 3

    def _example(self, n, rng):
        bits = rng.integers(0, 2, size=n)
        return [BOS, *(3 + bits).tolist(), SEP, 3 + int(bits.sum() % 2)], range(n + 2, n + 3)


class Addition(Task):
    name = "addition"
    PLUS, EQUALS, ZERO = 2, 3, 4  # digits d are tokens 4 + d
    vocab_size = 14

    def sequence_length(self, n: int) -> int:
        return 3 * n + 4

    def _example(self, n, rng):
        a, b = rng.integers(0, 10, size=n), rng.integers(0, 10, size=n)
        digits, carry = [], 0
        for da, db in zip(a.tolist(), b.tolist(), strict=True):  # schoolbook addition, least significant first
            s = da + db + carry
            digits.append(s % 10)
            carry = s // 10
        digits.append(carry)
        z = self.ZERO
        seq = [BOS, *(z + a).tolist(), self.PLUS, *(z + b).tolist(), self.EQUALS, *(z + d for d in digits)]
        return seq, range(2 * n + 3, 3 * n + 4)


class Retrieval(Task):
    """Fetch the token after a key ("content-based addressing", a needle in a haystack)."""

    name = "retrieval"
    KEY = 3  # values v are tokens 4 + v

    def __init__(self, num_values: int = 16):
        if num_values < 2:
            raise ValueError(f"retrieval needs num_values >= 2, got {num_values}")
        self.num_values = int(num_values)
        self.vocab_size = 4 + self.num_values

    def sequence_length(self, n: int) -> int:
        return n + 5

    def _example(self, n, rng):
        x = (4 + rng.integers(0, self.num_values, size=n)).tolist()
        j = int(rng.integers(0, n))  # the key goes just before x[j]
        return [BOS, *x[:j], self.KEY, *x[j:], SEP, self.KEY, x[j]], range(n + 4, n + 5)

    def describe(self) -> dict:
        return {**super().describe(), "num_values": self.num_values}


TASKS = {"copy": Copy, "parity": Parity, "addition": Addition, "retrieval": Retrieval}


def make_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
