"""Keyed randomness and vectorised whole-word masking.

Every random number here is a pure function of integer keys (seed, epoch, document, span slot,
position, purpose) through a counter-based hash (splitmix64). So which spans a document contributes
and which tokens are masked do not depend on worker count, process count, batch composition or the
point a run resumed from, and a whole batch is drawn with a few numpy operations.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Purpose tags: separate random streams for each decision about the same document.
SPAN_CHOICE, TRUNCATE, MASK_WORD, MASK_ACTION, RANDOM_TOKEN = 1, 2, 3, 4, 5

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-mixed hash of uint64 values."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def keyed_hash(*keys) -> np.ndarray:
    """uint64 hash of broadcastable integer keys (scalars or arrays)."""
    with np.errstate(over="ignore"):
        h = np.zeros((), dtype=np.uint64)
        for k in keys:
            k = np.asarray(k).astype(np.int64).astype(np.uint64)
            h = _mix64(h ^ k)
        return np.asarray(h)


def keyed_uniform(*keys) -> np.ndarray:
    """Uniform floats in [0, 1), one per broadcast element of the keys."""
    return (keyed_hash(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


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

    def forward(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & low
        for r in range(_FEISTEL_ROUNDS):
            left, right = right, left ^ (keyed_hash(*keys, r, right) & low)
        return (left << shift) | right

    out = forward(positions.astype(np.uint64))
    outside = out >= np.uint64(n)
    while outside.any():
        out[outside] = forward(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


def continuation_table(tokenizer) -> np.ndarray:
    """bool[vocab]: True where a token continues the previous word (so masks never split a word).

    WordPiece marks continuations with a prefix ("##"); byte-level BPE (RoBERTa) marks word STARTS
    with "Ġ", so anything else that is not special continues. Other tokenizers fall back to
    token-level masking, which is logged.
    """
    from tokenizers import models

    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    table = np.zeros(size, dtype=bool)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.model if backend is not None else None
    special = set(tokenizer.all_special_tokens)
    if isinstance(model, models.WordPiece):
        prefix = model.continuing_subword_prefix
        for tok, idx in vocab.items():
            table[idx] = tok.startswith(prefix)
    elif isinstance(model, models.BPE):
        for tok, idx in vocab.items():
            table[idx] = not tok.startswith("\u0120") and tok not in special
    else:
        logger.warning("Tokenizer model %s: no word-boundary rule known, masking single tokens.",
                       type(model).__name__)
    return table


def whole_word_mask(
    ids: np.ndarray,
    special: np.ndarray,
    is_continuation: np.ndarray,
    row_keys: Sequence[np.ndarray],
    mlm_probability: float,
    mask_token_id: int,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask whole words in a padded batch; returns (input ids, labels with -100 where not masked).

    ids, special: [N, L] (special = [CLS]/[SEP]/padding, never masked); row_keys: integer arrays [N]
    that identify each row (seed, epoch, document, slot). Per row, words are taken in a keyed random
    order while their tokens fit in round(tokens * p) (at least one word), like BERT's whole-word
    masking; each chosen token becomes [MASK] 80%, a random token 10%, itself 10%.
    """
    n_rows, length = ids.shape
    keys = [np.asarray(k, dtype=np.int64)[:, None] for k in row_keys]  # [N, 1] each
    cont = is_continuation[ids] & ~special
    prev_special = np.ones_like(special)
    prev_special[:, 1:] = special[:, :-1]
    starts = ~special & (~cont | prev_special)
    word_of = np.cumsum(starts, axis=1) - 1  # [N, L] word index of each token (garbage on specials)
    n_words = starts.sum(axis=1)  # [N]
    n_tokens = (~special).sum(axis=1)
    budget = np.maximum(1, np.rint(n_tokens * mlm_probability)).astype(np.int64)

    max_words = max(int(n_words.max(initial=0)), 1)
    rows = np.broadcast_to(np.arange(n_rows)[:, None], ids.shape)
    word_len = np.zeros((n_rows, max_words), dtype=np.int64)
    real = ~special
    np.add.at(word_len, (rows[real], word_of[real]), 1)

    word_idx = np.arange(max_words)[None, :]
    priority = keyed_uniform(*keys, word_idx, MASK_WORD)  # [N, W]
    priority = np.where(word_idx < n_words[:, None], priority, np.inf)
    order = np.argsort(priority, axis=1, kind="stable")
    taken = np.cumsum(np.take_along_axis(word_len, order, axis=1), axis=1)
    pick_sorted = ((taken <= budget[:, None]) | (np.arange(max_words)[None, :] == 0))
    pick_sorted &= np.arange(max_words)[None, :] < n_words[:, None]
    chosen = np.zeros((n_rows, max_words), dtype=bool)
    np.put_along_axis(chosen, order, pick_sorted, axis=1)

    masked = real & np.take_along_axis(chosen, np.clip(word_of, 0, max_words - 1), axis=1)
    labels = np.where(masked, ids, -100)
    # The replacement is drawn at the masked positions only (a seventh of the tokens), keyed as every draw.
    at_row, at_pos = np.nonzero(masked)
    at_keys = [np.asarray(k, dtype=np.int64)[at_row] for k in row_keys]
    action = keyed_uniform(*at_keys, at_pos, MASK_ACTION)
    out = ids.copy()
    to_mask = action < 0.8
    out[at_row[to_mask], at_pos[to_mask]] = mask_token_id
    to_random = (action >= 0.8) & (action < 0.9)
    random_tok = (keyed_uniform(*(k[to_random] for k in at_keys), at_pos[to_random], RANDOM_TOKEN)
                  * vocab_size).astype(np.int64)
    out[at_row[to_random], at_pos[to_random]] = random_tok
    return out, labels
