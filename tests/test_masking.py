"""Keyed randomness and whole-word masking."""

import numpy as np
import pytest

from coco_accel.common.keyed_random import keyed_uniform
from conftest import real_text, trained_tokenizer
from coco_accel.training.masking import continuation_table, whole_word_mask


def test_keyed_uniform_is_a_pure_function_of_its_keys():
    a = keyed_uniform(42, 3, np.arange(1000), 7)
    b = keyed_uniform(42, 3, np.arange(1000), 7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, keyed_uniform(43, 3, np.arange(1000), 7))
    assert a.min() >= 0 and a.max() < 1
    assert abs(a.mean() - 0.5) < 0.05
    # Element i depends only on its own keys, not on the array it came in.
    assert keyed_uniform(42, 3, 17, 7) == a[17]


def _batch(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="np")
    ids = enc["input_ids"].astype(np.int64)
    special = (enc["attention_mask"] == 0) | np.isin(ids, [tokenizer.cls_token_id, tokenizer.sep_token_id])
    return ids, special


TEXTS = ["unbelievably tokenization internationalization photosynthesis " * 6,
         "the cat sat on the mat while the dog slept by the door " * 4]


def test_whole_words_are_masked_together(tokenizer):
    table = continuation_table(tokenizer)
    ids, special = _batch(tokenizer, TEXTS)
    n = len(TEXTS)
    for seed in range(20):
        keys = (np.full(n, seed), np.zeros(n), np.arange(n), np.zeros(n))
        out, labels = whole_word_mask(ids, special, table, keys,
                                      mlm_probability=0.15, mask_token_id=tokenizer.mask_token_id,
                                      vocab_size=len(tokenizer))
        masked = labels != -100
        assert not (masked & special).any()
        np.testing.assert_array_equal(labels[masked], ids[masked])
        # A continuation piece ("##...") is masked exactly when the piece before it is.
        cont = table[ids] & ~special
        rows, cols = np.nonzero(cont)
        np.testing.assert_array_equal(masked[rows, cols], masked[rows, cols - 1])
        assert (masked.sum(axis=1) >= 1).all()
        np.testing.assert_array_equal(out[~masked], ids[~masked])


def test_mask_rate_and_replacement_split(tokenizer):
    table = continuation_table(tokenizer)
    ids, special = _batch(tokenizer, ["word " * 100] * 64)
    n = ids.shape[0]
    keys = (np.full(n, 1), np.zeros(n), np.arange(n), np.zeros(n))
    out, labels = whole_word_mask(ids, special, table, keys,
                                  mlm_probability=0.15, mask_token_id=tokenizer.mask_token_id,
                                  vocab_size=len(tokenizer))
    masked = labels != -100
    assert masked.sum() / (~special).sum() == pytest.approx(0.15, abs=0.01)
    became_mask = (out == tokenizer.mask_token_id) & masked
    unchanged = (out == ids) & masked
    assert became_mask.sum() / masked.sum() == pytest.approx(0.8, abs=0.05)
    assert unchanged.sum() / masked.sum() == pytest.approx(0.1, abs=0.04)


def test_a_row_is_masked_the_same_whatever_batch_it_is_in(tokenizer):
    table = continuation_table(tokenizer)
    ids, special = _batch(tokenizer, TEXTS)
    keys = (np.full(2, 5), np.full(2, 1), np.array([10, 11]), np.zeros(2))
    _, both = whole_word_mask(ids, special, table, keys,
                              mlm_probability=0.15, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer))
    ids1, special1 = _batch(tokenizer, TEXTS[1:])
    keys1 = tuple(k[1:] for k in keys)
    _, alone = whole_word_mask(ids1, special1, table, keys1,
                               mlm_probability=0.15, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer))
    width = ids1.shape[1]
    np.testing.assert_array_equal(both[1, :width], alone[0])


def test_replacements_are_the_keyed_draws_of_their_positions(tokenizer):
    """Which masked token becomes [MASK], a random token or itself is the keyed draw of (row keys, position):
    the definition, evaluated here on the whole grid, pins the values (runs resumed under a later
    version see the same masks)."""
    from coco_accel.common.keyed_random import MASK_ACTION, RANDOM_TOKEN

    ids, special = _batch(tokenizer, TEXTS * 8)
    n = ids.shape[0]
    keys = (np.full(n, 5), np.full(n, 2), np.arange(n) // 2 + 100, np.arange(n) % 2)
    out, labels = whole_word_mask(ids, special, continuation_table(tokenizer), keys,
                                  mlm_probability=0.3, mask_token_id=103, vocab_size=30522)
    grid = [np.asarray(k)[:, None] for k in keys] + [np.arange(ids.shape[1])[None, :]]
    action = keyed_uniform(*grid, MASK_ACTION)
    drawn = (keyed_uniform(*grid, RANDOM_TOKEN) * 30522).astype(np.int64)
    chosen = labels != -100
    expected = np.where(chosen & (action < 0.8), 103, ids)
    expected = np.where(chosen & (action >= 0.8) & (action < 0.9), drawn, expected)
    np.testing.assert_array_equal(out, expected)
    assert chosen.sum() > 50 and (out[chosen] == 103).mean() > 0.6 and (out[chosen] == drawn[chosen]).any()


def test_a_word_that_would_overflow_is_skipped_and_later_words_still_fill_the_budget(tokenizer):
    """BERT's and HF's whole-word rule: words in random order, one that no longer fits is skipped and the
    next ones are still tried. 'photosynthesis' is 3 pieces; with four one-piece words the 7 tokens at
    p = 0.3 have a budget of 2, which two one-piece words fill exactly, whichever order the keys give.
    (A rule that stops at the first overflowing word masks 1 token when a short word comes first, and one
    that always takes the first word masks 3 when the long word comes first.)"""
    table = continuation_table(tokenizer)
    ids, special = _batch(tokenizer, ["photosynthesis cat dog sun sky"] * 200)
    assert (~special).sum(axis=1)[0] == 7
    n = ids.shape[0]
    keys = (np.full(n, 3), np.zeros(n), np.arange(n), np.zeros(n))
    _, labels = whole_word_mask(ids, special, table, keys,
                                mlm_probability=0.3, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer))
    masked = labels != -100
    assert (masked.sum(axis=1) == 2).all()
    long_word = np.isin(ids, tokenizer.convert_tokens_to_ids(["photos", "##yn", "##thesis"]))
    assert not (masked & long_word).any()


def test_mask_rate_on_multi_piece_words_reaches_the_budget(tokenizer):
    """25-token spans of real multi-piece words: the masked share is the budget's (round(0.15 n) / n, 0.16
    for n = 25), not the ~0.14 that stopping at the first overflowing word gave."""
    table = continuation_table(tokenizer)
    words = "unbelievably tokenization cat internationalization photosynthesis dog the sun".split()
    rng = np.random.default_rng(0)
    texts = []
    for _ in range(400):
        pieces, text = 0, []
        while pieces < 25:
            w = words[rng.integers(len(words))]
            k = len(tokenizer.tokenize(w))
            if pieces + k <= 25:
                text.append(w)
                pieces += k
        texts.append(" ".join(text))
    ids, special = _batch(tokenizer, texts)
    assert ((~special).sum(axis=1) == 25).all()
    n = ids.shape[0]
    keys = (np.full(n, 1), np.zeros(n), np.arange(n), np.zeros(n))
    _, labels = whole_word_mask(ids, special, table, keys,
                                mlm_probability=0.15, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer))
    share = (labels != -100).sum() / (~special).sum()
    assert share == pytest.approx(4 / 25, abs=0.004)


# Whole words for every tokenizer kind, from tokenizers trained here on real text (conftest.trained_tokenizer)
# with a small vocabulary, so that most words split into several tokens.

@pytest.mark.parametrize("kind", ["wordpiece", "byte-level bpe", "unigram"])
def test_whole_words_from_each_tokenizer_kinds_own_boundaries(kind):
    """The words the table derives are the text's whitespace-separated words (most of them several tokens
    with an 800-token vocabulary), every token of a word is masked with it, and the masked share is the
    rule's: about 15% of the tokens, a little less where a long word no longer fits a row's budget."""
    texts = real_text()
    tokenizer = trained_tokenizer(kind, texts)
    table = continuation_table(tokenizer)
    sample = [" ".join(t.split()[:40]) for t in texts[:64]]  # ~40 words a row
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in sample]
    multi = 0
    for text, ids in zip(sample, enc):
        starts = [i for i, tok in enumerate(ids) if i == 0 or not table[tok]]
        words = [ids[a:b] for a, b in zip(starts, starts[1:] + [len(ids)])]
        if kind == "wordpiece":  # BERT's words: its pre-tokenizer cuts punctuation off as words of their own
            backend = tokenizer.backend_tokenizer
            expected = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]
            assert len(words) == len(expected), (kind, text[:80])
        else:
            assert [tokenizer.decode(w).strip() for w in words] == text.split(), (kind, text[:80])
        multi += sum(len(w) > 1 for w in words)
    assert multi > 0.3 * sum(len(t.split()) for t in sample)  # real multi-token words, plenty of them

    width = 2 + max(map(len, enc))  # rows as the collator lays them out: [CLS] span [SEP], padded
    ids = np.full((len(enc), width), tokenizer.pad_token_id, dtype=np.int64)
    for row, span in enumerate(enc):
        ids[row, :len(span) + 2] = [tokenizer.cls_token_id, *span, tokenizer.sep_token_id]
    special = np.isin(ids, [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id])
    n = ids.shape[0]
    keys = (np.full(n, 5), np.zeros(n), np.arange(n), np.zeros(n))
    out, labels = whole_word_mask(ids, special, table, keys, mlm_probability=0.15,
                                  mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer))
    masked = labels != -100
    later = table[ids] & ~special
    later[:, 1:] &= ~special[:, :-1]  # the token after [CLS] starts a word, marked or not
    rows, cols = np.nonzero(later)  # a word's later tokens go with the one before
    np.testing.assert_array_equal(masked[rows, cols], masked[rows, cols - 1])
    share = masked.sum() / (~special).sum()
    assert 0.12 < share <= 0.151, share


def test_a_tokenizer_without_word_boundaries_is_refused_unless_single_tokens_are_asked_for():
    from coco_accel.training.masking import MaskingError

    tokenizer = trained_tokenizer("bpe without markers", real_text(100))
    with pytest.raises(MaskingError, match="--whole_word_mask false"):
        continuation_table(tokenizer)
    assert not continuation_table(tokenizer, whole_words=False).any()  # every token its own word
