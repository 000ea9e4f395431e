"""Vectorised whole-word masking, every choice drawn from keyed randomness (keyed_random.py): which
tokens are masked does not depend on worker count, process count, batch composition or the point a run
resumed from."""

from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np

from coco_accel.common.keyed_random import MASK_ACTION, MASK_WORD, RANDOM_TOKEN, keyed_hash, uniform_of


class MaskingError(ValueError):
    """A tokenizer whose word boundaries cannot be derived; the message names the flag that masks tokens."""


def _word_start_marker(tokenizer) -> Optional[str]:
    """The prefix that marks a word's first token in a tokenizer without a continuation prefix: "Ġ" for
    byte-level BPE (RoBERTa, ModernBERT, GPT-style), the Metaspace replacement ("▁") for SentencePiece-
    style tokenizers (BPE or Unigram: XLM-R, CamemBERT). None when its pre-tokenizer marks neither."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    found = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                found.append("\u0120")
            elif node.get("type") == "Metaspace":
                found.append(node.get("replacement", "\u2581"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    spec = json.loads(backend.to_str())
    walk(spec.get("pre_tokenizer"))
    walk(spec.get("normalizer"))  # older SentencePiece conversions put the "▁" replacement here
    return found[0] if found else None


def continuation_table(tokenizer, whole_words: bool = True) -> np.ndarray:
    """bool[vocab]: True where a token continues the previous word (so masks never split a word), from the
    tokenizer's own word boundaries: WordPiece marks continuations with its prefix ("##"); byte-level BPE
    and SentencePiece-style tokenizers mark word starts ("Ġ", "▁"), so every other token that is not special
    continues. A tokenizer that marks neither raises MaskingError; whole_words=False (--whole_word_mask
    false) masks single tokens instead (an all-False table)."""
    from tokenizers import models

    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    table = np.zeros(size, dtype=bool)
    if not whole_words:
        return table
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.model if backend is not None else None
    if isinstance(model, models.WordPiece):
        prefix = model.continuing_subword_prefix
        for tok, idx in vocab.items():
            table[idx] = tok.startswith(prefix)
        return table
    marker = _word_start_marker(tokenizer)
    if marker is None:
        raise MaskingError(
            f"The tokenizer ({type(model).__name__ if model is not None else type(tokenizer).__name__} without a "
            "byte-level or Metaspace pre-tokenizer) does not say where words start, so whole words cannot be "
            "masked: use a tokenizer that does, or mask single tokens with --whole_word_mask false.")
    special = set(tokenizer.all_special_tokens)
    for tok, idx in vocab.items():
        table[idx] = not tok.startswith(marker) and tok not in special
    return table


def whole_word_mask(
    ids: np.ndarray,
    special: np.ndarray,
    is_continuation: np.ndarray,
    row_keys: Sequence[np.ndarray],
    *,
    mlm_probability: float,
    mask_token_id: int,
    vocab_size: int,
    real_at: Optional[tuple[np.ndarray, np.ndarray]] = None,
    in_place: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask whole words in a padded batch; returns (input ids, labels with -100 where not masked).

    ids, special: [N, L] (special = [CLS]/[SEP]/padding, never masked); row_keys: integer arrays [N]
    that identify each row (seed, epoch, document, slot). Per row, BERT's whole-word rule as HF's
    collator applies it: words in a keyed random order, each taken if its tokens still fit in
    round(tokens * p) and skipped if not, until the budget is full; each chosen token becomes [MASK]
    80%, a random token 10%, itself 10%. Works on the real tokens only (a batch padded to 128 holds
    about 27 per row), never on the padding. real_at: the (rows, columns) of the real tokens in row-major
    order, when the caller knows them (`np.nonzero(~special)` otherwise); in_place: write into `ids`.
    """
    n_rows = ids.shape[0]
    at_row, at_col = np.nonzero(~special) if real_at is None else real_at  # row-major: each row's tokens in order
    tokens = ids[at_row, at_col]
    follows = np.zeros(len(tokens), dtype=bool)  # the token right before is a real one of the same row
    follows[1:] = (at_row[1:] == at_row[:-1]) & (at_col[1:] == at_col[:-1] + 1)
    starts = ~(is_continuation[tokens] & follows)
    word_of = np.cumsum(starts) - 1  # [T] word of each token, numbered over the batch
    row_hash = np.broadcast_to(keyed_hash(*(np.asarray(k, dtype=np.int64) for k in row_keys)), (n_rows,))
    budget = np.maximum(1, np.rint(np.bincount(at_row, minlength=n_rows) * mlm_probability)).astype(np.int64)
    chosen = _choose_words(at_row[starts], np.bincount(word_of), budget, row_hash)

    token_masked = chosen[word_of]
    at_row, at_pos = at_row[token_masked], at_col[token_masked]  # the masked positions, row-major
    labels = np.full(ids.shape, -100, dtype=ids.dtype)
    labels[at_row, at_pos] = tokens[token_masked]
    out = ids if in_place else ids.copy()
    _replace(out, at_row, at_pos, row_hash[at_row], mask_token_id=mask_token_id, vocab_size=vocab_size)
    return out, labels


def _choose_words(word_row: np.ndarray, word_len: np.ndarray, budget: np.ndarray, row_hash: np.ndarray) -> np.ndarray:
    """Which words are masked, [W] bool. word_row: each word's row (sorted); word_len: its tokens; budget:
    per row, the tokens to mask. Per row, the words in a keyed random order, each taken if it still fits
    the budget and skipped if not, until the budget is full (BERT's rule)."""
    n_rows = len(budget)
    first_word = np.searchsorted(word_row, np.arange(n_rows))  # [N] the row's first word
    word_in_row = np.arange(len(word_row)) - first_word[word_row]
    # By row, then by the word's keyed priority (the top bits of its hash): one sort of uint64 keys.
    row_bits = max(1, int(n_rows - 1).bit_length())
    priority = keyed_hash(word_in_row, MASK_WORD, prefix=row_hash[word_row]) >> np.uint64(row_bits)
    order = np.argsort((word_row.astype(np.uint64) << np.uint64(64 - row_bits)) | priority, kind="stable")
    rank = np.arange(len(order)) - first_word[word_row[order]]
    n_words = np.bincount(word_row, minlength=n_rows)
    lengths = np.zeros((n_rows, max(int(n_words.max(initial=0)), 1)), dtype=np.int64)
    lengths[word_row[order], rank] = word_len[order]
    taken = np.zeros(n_rows, dtype=np.int64)
    accepted = np.zeros(lengths.shape, dtype=bool)
    for k in range(lengths.shape[1]):  # the k-th word of every row at once: take it if it still fits
        fits = (lengths[:, k] > 0) & (taken + lengths[:, k] <= budget)
        accepted[:, k] = fits
        taken += np.where(fits, lengths[:, k], 0)
        if not ((taken < budget) & (n_words > k + 1)).any():
            break
    chosen = np.zeros(len(word_row), dtype=bool)
    chosen[order] = accepted[word_row[order], rank]
    return chosen


def _replace(out: np.ndarray, at_row: np.ndarray, at_pos: np.ndarray, at_hash: np.ndarray, *, mask_token_id: int,
             vocab_size: int) -> None:
    """BERT's replacement at the masked positions, in `out`: [MASK] 80%, a random token 10%, unchanged
    10%. Drawn at the masked positions only (a seventh of the tokens), keyed as every draw."""
    action = uniform_of(keyed_hash(at_pos, MASK_ACTION, prefix=at_hash))
    to_mask = action < 0.8
    out[at_row[to_mask], at_pos[to_mask]] = mask_token_id
    to_random = (action >= 0.8) & (action < 0.9)
    random_tok = (uniform_of(keyed_hash(at_pos[to_random], RANDOM_TOKEN, prefix=at_hash[to_random]))
                  * vocab_size).astype(np.int64)
    out[at_row[to_random], at_pos[to_random]] = random_tok
