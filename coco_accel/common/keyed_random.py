"""Keyed randomness: every random number is a pure function of integer keys.

The keys (seed, epoch, document, span slot, position, purpose) go through a counter-based hash
(splitmix64). So the epoch's document order, which spans a document contributes and which tokens are
masked do not depend on worker count, process count, batch composition or the point a run resumed
from, and a whole batch is drawn with a few numpy operations.
"""

from __future__ import annotations

import numpy as np

# Purpose tags: separate random streams for each decision about the same document. Training's batches:
SPAN_CHOICE, TRUNCATE, MASK_WORD, MASK_ACTION, RANDOM_TOKEN = 1, 2, 3, 4, 5
DOC_ORDER = 21  # the epoch's document order
SPAN_BREAK, HELD_OUT = 11, 12  # preprocessing: a break before a sentence, a document held out

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-mixed hash of uint64 values."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def keyed_hash(*keys, prefix=None) -> np.ndarray:
    """uint64 hash of broadcastable integer keys (scalars or arrays).

    The keys are folded in one at a time, so `keyed_hash(c, d, prefix=keyed_hash(a, b))` equals
    `keyed_hash(a, b, c, d)`: keys shared by many elements (a row's seed, epoch, document and slot)
    are hashed once per row and the result gathered, instead of once per token.
    """
    with np.errstate(over="ignore"):
        h = np.zeros((), dtype=np.uint64) if prefix is None else np.asarray(prefix, dtype=np.uint64)
        for k in keys:
            k = np.asarray(k).astype(np.int64).astype(np.uint64)
            h = _mix64(h ^ k)
        return np.asarray(h)


def uniform_of(h: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) from uint64 hashes (their top 53 bits)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def keyed_uniform(*keys) -> np.ndarray:
    """Uniform floats in [0, 1), one per broadcast element of the keys."""
    return uniform_of(keyed_hash(*keys))


_FEISTEL_ROUNDS = 6


def keyed_permutation(positions: np.ndarray, n: int, *keys) -> np.ndarray:
    """The images of `positions` under a keyed random permutation of range(n), in O(len(positions)).

    A balanced Feistel network on the smallest even-bit domain 2^(2h) >= n (a bijection for any
    round function), walked again from any image >= n until it lands inside range(n) (cycle-walking
    keeps it a bijection of range(n)). The domain is under 4n, so a walk takes under 4 passes on
    average. Nothing the size of n is ever built: a batch of a 47M-document epoch costs what a batch
    of a 100-document one does.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if n < 1 or (positions.size and (positions.min() < 0 or positions.max() >= n)):
        raise ValueError(f"positions must lie in range({n})")
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    shift = np.uint64(half)

    rounds = [keyed_hash(*keys, r) for r in range(_FEISTEL_ROUNDS)]  # each round's keys, hashed once

    def forward(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & low
        for prefix in rounds:
            left, right = right, left ^ (keyed_hash(right, prefix=prefix) & low)
        return (left << shift) | right

    out = forward(positions.astype(np.uint64))
    outside = out >= np.uint64(n)
    while outside.any():
        out[outside] = forward(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)
