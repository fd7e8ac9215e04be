"""Hadamard matrices of order K * 2^k, built programmatically (no tables).

A Hadamard matrix H of order n has entries +-1 and H H^T = n I. Orders used by model widths:

* 2^k: Sylvester, H_{2m} = [[H_m, H_m], [H_m, -H_m]] (entry (-1)^popcount(i & j)).
* q + 1 for a prime power q = 3 (mod 4): Paley construction I (Paley 1933):
  H = I + [[0, 1^T], [-1, Q]], Q the Jacobsthal matrix Q_ij = chi(x_i - x_j) of GF(q),
  chi the quadratic character. Gives 12 (q=11), 20 (19), 60 (59), 108 (107), 140 (139).
* 2 (q + 1) for a prime power q = 1 (mod 4): Paley construction II:
  C = [[0, 1^T], [1, Q]] (symmetric conference matrix), H = C (x) [[1, 1], [1, -1]] + I (x)
  [[1, -1], [-1, -1]]. Gives 28 (q=13), 36 (17), 52 (25 = 5^2, arithmetic in GF(5)[t]/(t^2-2)).
* Kronecker products: 40 = 2 x 20 is handled as 20 x 2^(k+1).
* 4n from Williamson matrices (Williamson 1944): four symmetric circulant n x n +-1 matrices
  A, B, C, D (they commute) with A^2 + B^2 + C^2 + D^2 = 4n I give
  H = [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]. Gives 156 (n = 39) and
  172 (n = 43; Llama's 11008 = 172 * 64), which Paley and Sylvester cannot reach. The first rows
  are published data (n = 43: M. Hall, "Combinatorial Theory", 2nd ed. 1983; n = 39:
  S. London, PhD thesis, UIC 2013; as tabulated in SageMath's hadamard_matrix.py); a symmetric
  circulant is fixed by its first (n + 1) / 2 entries, which is all that is stored
  (:data:`WILLIAMSON_HALF_ROWS`).

Every n = K * 2^k used by :func:`tokenbounds.hadamard_transform` is decomposed as
H_n = H_K (x) H_{2^k} with the unique base K = 4 * odd(n) (or K = 1 for a power of two).
"""

from __future__ import annotations

import functools

import numpy as np

# base order K -> (construction, q)
_BASES: dict[int, tuple[str, int]] = {
    12: ("paley1", 11),
    20: ("paley1", 19),
    28: ("paley2", 13),
    36: ("paley2", 17),
    52: ("paley2", 25),
    60: ("paley1", 59),
    108: ("paley1", 107),
    140: ("paley1", 139),
    156: ("williamson", 39),
    172: ("williamson", 43),
}
SUPPORTED_BASES: tuple[int, ...] = (1, *sorted(_BASES))
"""Base orders K with a construction here; n = K * 2^k is supported (40 = 20 * 2 included)."""
UNSUPPORTED_BASES: tuple[int, ...] = ()
"""Kept for backward compatibility: every base order K of issue 4 is now constructed."""

WILLIAMSON_HALF_ROWS: dict[int, tuple[str, str, str, str]] = {
    # entries 0 .. (n - 1) / 2 of the first rows of A, B, C, D ('+' = 1, '-' = -1); the rest
    # follow from symmetry a_i = a_(n - i). Checked: sum of the four PAFs is 0 at every shift != 0.
    39: ("+++--+-+-----+--++--", "+++--++-+---+-+--+--", "++++---+--++----+-+-", "+---++-+-+-----+++-+"),
    43: ("++---++++-+--+--++----", "+++-+-++--+-+-++++-+--", "++-++++++----+-+--++-+",
         "+---++--++++-+-+++-++-"),
}


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def hadamard_factor(n: int) -> tuple[int, int] | None:
    """(K, m) with n = K * m, m a power of two and H_K constructible, or None if unsupported."""
    if n < 1:
        return None
    if _is_pow2(n):
        return 1, n
    odd = n
    while odd % 2 == 0:
        odd //= 2
    base = 4 * odd
    if base in _BASES and n % base == 0:
        return base, n // base
    return None


def is_supported_size(n: int) -> bool:
    """True when :func:`tokenbounds.hadamard_transform` supports a last dimension of size n."""
    return hadamard_factor(n) is not None


def next_supported_size(n: int) -> int:
    """Smallest supported size >= n (used to pad dimensions that have no Hadamard matrix)."""
    m = max(1, int(n))
    while not is_supported_size(m):
        m += 1
    return m


def _field(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Elements of GF(q), q = p or p^2 (p odd), as an addition table and the quadratic character.

    Returns (sub [q, q] int: index of x_i - x_j, chi [q] int in {-1, 0, 1}).
    """
    p = q
    e = 1
    for cand in range(2, q + 1):
        if q % cand == 0:
            p = cand
            break
    while p**e < q:
        e += 1
    if p**e != q or e > 2 or p == 2:
        raise ValueError(f"GF({q}) is not supported (need an odd prime or the square of one)")
    if e == 1:
        elems = np.arange(q)[:, None]
        nonres = 0
    else:
        squares_mod_p = {(a * a) % p for a in range(1, p)}
        nonres = next(r for r in range(2, p) if r not in squares_mod_p)  # t^2 = nonres is irreducible
        elems = np.array([(a, b) for a in range(p) for b in range(p)])

    def index(v: np.ndarray) -> np.ndarray:
        return v[..., 0] if e == 1 else v[..., 0] * p + v[..., 1]

    diff = (elems[:, None, :] - elems[None, :, :]) % p
    sub = index(diff)
    if e == 1:
        sq = (elems[:, 0] ** 2) % p
        sq_idx = sq
    else:
        a, b = elems[:, 0], elems[:, 1]
        sq_idx = index(np.stack([(a * a + nonres * b * b) % p, (2 * a * b) % p], axis=-1))
    chi = -np.ones(q, dtype=np.int64)
    chi[np.unique(sq_idx)] = 1
    chi[0] = 0
    return sub, chi


def _jacobsthal(q: int) -> np.ndarray:
    sub, chi = _field(q)
    return chi[sub]


def _paley1(q: int) -> np.ndarray:
    Q = _jacobsthal(q)
    n = q + 1
    S = np.zeros((n, n), dtype=np.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return np.eye(n, dtype=np.int64) + S


def _paley2(q: int) -> np.ndarray:
    Q = _jacobsthal(q)
    n = q + 1
    C = np.zeros((n, n), dtype=np.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    return np.kron(C, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(n, dtype=np.int64), np.array([[1, -1], [-1, -1]]))


def williamson_first_rows(n: int) -> np.ndarray:
    """First rows [4, n] (int64, +-1) of the symmetric circulant Williamson matrices A, B, C, D."""
    if n not in WILLIAMSON_HALF_ROWS:
        raise ValueError(f"no Williamson matrices of order {n} stored; have {sorted(WILLIAMSON_HALF_ROWS)}")
    rows = np.empty((4, n), dtype=np.int64)
    for r, half in enumerate(WILLIAMSON_HALF_ROWS[n]):
        h = np.array([1 if c == "+" else -1 for c in half], dtype=np.int64)
        assert h.size == (n + 1) // 2
        rows[r, : h.size] = h
        rows[r, h.size:] = h[1: n - h.size + 1][::-1]  # a_i = a_(n-i)
    return rows


def periodic_autocorrelation(row: np.ndarray) -> np.ndarray:
    """PAF_a(s) = sum_i a_i a_(i+s mod n), s = 0..n-1 (the first row of the circulant C C^T)."""
    a = np.asarray(row, dtype=np.int64)
    return np.array([int(a @ np.roll(a, -s)) for s in range(a.size)], dtype=np.int64)


def circulant(row: np.ndarray) -> np.ndarray:
    """Circulant matrix with first row ``row``: C_ij = row[(j - i) mod n]."""
    row = np.asarray(row)
    n = row.size
    return row[(np.arange(n)[None, :] - np.arange(n)[:, None]) % n]


def _williamson(n: int) -> np.ndarray:
    a, b, c, d = (circulant(r) for r in williamson_first_rows(n))
    return np.block([[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]])


@functools.cache
def _base_matrix(k: int) -> np.ndarray:
    if k == 1:
        return np.ones((1, 1), dtype=np.int8)
    kind, q = _BASES[k]
    h = {"paley1": _paley1, "paley2": _paley2, "williamson": _williamson}[kind](q)
    assert h.shape == (k, k)
    return h.astype(np.int8)


def base_hadamard(k: int) -> np.ndarray:
    """The K x K Hadamard matrix (int8, entries +-1) for a supported base order K."""
    if k != 1 and k not in _BASES:
        raise ValueError(f"no Hadamard construction for base order {k}; supported: {SUPPORTED_BASES}")
    out = _base_matrix(k).copy()
    out.setflags(write=False)
    return out


def sylvester(m: int) -> np.ndarray:
    """Sylvester Hadamard matrix of order m = 2^k (int8): entry (-1)^popcount(i & j)."""
    if not _is_pow2(m):
        raise ValueError(f"Sylvester order must be a power of two, got {m}")
    i = np.arange(m)
    bits = np.bitwise_and(i[:, None], i[None, :])
    pop = np.zeros_like(bits)
    while bits.any():
        pop += bits & 1
        bits >>= 1
    return (1 - 2 * (pop & 1)).astype(np.int8)


def hadamard_matrix(n: int) -> np.ndarray:
    """Dense Hadamard matrix H_n = H_K (x) H_{n/K} (int8) used by hadamard_transform (tests, oracle)."""
    fac = hadamard_factor(n)
    if fac is None:
        raise ValueError(f"no Hadamard matrix of order {n} here; supported: K * 2^k for K in {SUPPORTED_BASES}")
    k, m = fac
    return np.kron(base_hadamard(k).astype(np.int64), sylvester(m).astype(np.int64)).astype(np.int8)


def random_signs(n: int, seed: int, stream: int = 0) -> np.ndarray:
    """n signs in {-1, +1} (int8) from a counter-based splitmix64 generator keyed by (seed, stream).

    Platform- and library-version-independent, so a stored seed (not the signs) describes a
    randomized Hadamard transform exactly: sign_i = 1 - 2 * top_bit(splitmix64(key + (i+1) G)).
    """
    mask = (1 << 64) - 1
    key = (int(seed) * 0x9E3779B97F4A7C15 + int(stream) * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & mask
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (1 - 2 * (z >> np.uint64(63)).astype(np.int64)).astype(np.int8)
