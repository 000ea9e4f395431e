"""Sentence -> token ids for BERT-style WordPiece tokenizers, identical to the Rust tokenizer's, faster.

A BERT uncased tokenizer cleans and lowercases the text, splits it into words at whitespace and
punctuation, and tokenizes every word on its own. For ASCII text without control characters the
cleaning is the identity and the split is one regular expression, so a sentence's ids are the
concatenation of its words' ids, and a word's ids never change: they are computed once by the Rust
model and kept (as are those of whitespace-separated chunks, so that the hot path is str.split).
Other sentences (accents, CJK, typographic punctuation) are cut at whitespace too, and each chunk
that is not printable ASCII gets its ids from the full Rust pipeline once; sentences with characters
that Python splits at but BERT deletes (vertical tab, form feed, U+001C-U+001F, ...) go to the Rust
tokenizer whole. `tests/test_wordpiece.py` checks equality with the Rust tokenizer sentence by
sentence, over every character of the Basic Multilingual Plane.
"""

from __future__ import annotations

import json
import re
from itertools import chain
from pathlib import Path

_WORDS = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")  # after lowercasing ASCII: words and single punctuation marks
_UNSAFE = re.compile(r"[^\t\n\r\x20-\x7e]")  # anything but printable ASCII and \t \n \r
# Characters str.split() splits at but BERT's normalizer deletes as control characters (or keeps):
# only sentences without them can be cut into whitespace-free chunks the way BERT cuts them.
_SPLIT_DISAGREES = re.compile("[\x0b\x0c\x1c-\x1f\x85\u2028\u2029]")


def _is_bert_uncased(spec: dict) -> bool:
    norm, pre, model = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    return (norm.get("type") == "BertNormalizer" and norm.get("lowercase") is True
            and norm.get("clean_text") is True and norm.get("strip_accents") in (None, True)
            and pre.get("type") == "BertPreTokenizer" and model.get("type") == "WordPiece")


# tokenizer_config.json keys through which transformers would rebuild a BERT normalizer, and the
# BertNormalizer fields they set
_BERT_OPTIONS = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
                 "tokenize_chinese_chars": "handle_chinese_chars"}


def load_backend_tokenizer(folder: str):
    """The Rust tokenizer of an HF tokenizer folder, without truncation or padding (spans need every token).

    A BERT folder whose tokenizer.json agrees with its tokenizer_config.json is read directly (no
    transformers import: about 1.5 s of start-up, torch included); anything else goes through
    `AutoTokenizer`, which may rebuild parts of the pipeline from the config.
    """
    from tokenizers import Tokenizer

    path = Path(folder)
    rust = None
    if (path / "tokenizer.json").is_file():
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        candidate = Tokenizer.from_file(str(path / "tokenizer.json"))
        norm = json.loads(candidate.to_str()).get("normalizer") or {}
        agrees = (config.get("tokenizer_class") in ("BertTokenizer", "BertTokenizerFast")
                  and norm.get("type") == "BertNormalizer"
                  and all(key not in config or config[key] == norm.get(field) for key, field in _BERT_OPTIONS.items()))
        rust = candidate if agrees else None
    if rust is None:
        from transformers import AutoTokenizer

        rust = Tokenizer.from_str(AutoTokenizer.from_pretrained(str(path)).backend_tokenizer.to_str())
    rust.no_truncation()
    rust.no_padding()
    return rust


class _Memo(dict):
    """key -> tuple of ids, computed by `ids_of` on first sight; bounded memory on huge corpora (a full
    table starts over)."""

    def __init__(self, ids_of, limit: int):
        super().__init__()
        self.ids_of = ids_of
        self.limit = limit

    def __missing__(self, key: str) -> tuple:
        if len(self) >= self.limit:
            self.clear()
        ids = self[key] = tuple(self.ids_of(key))
        return ids


def _tables(tokenizer, limit: int) -> tuple[_Memo, _Memo, _Memo]:
    """The encoder's memo tables, empty:
    - words: word -> its ids from the Rust WordPiece model (max chars -> [UNK] included);
    - chunks: whitespace-free printable-ASCII chunk ("(1999)," or "word", lowercased) -> its words' ids
      in order. Splitting at whitespace is C-fast and chunks repeat like words, so the regular
      expression runs once per new chunk;
    - raw chunks: any other whitespace-free chunk ("Café", "naïve,", "中文") -> its ids from the full
      Rust pipeline (normalizer included). BERT's normalizer and pre-tokenizer act on each character,
      or split at whitespace, so a chunk's ids are the same alone as inside its sentence."""
    model = tokenizer.model
    words = _Memo(lambda word: (t.id for t in model.tokenize(word)), limit)
    chunks = _Memo(lambda chunk: chain.from_iterable(map(words.__getitem__, _WORDS.findall(chunk))), limit)
    raw = _Memo(lambda chunk: tokenizer.encode(chunk, add_special_tokens=False).ids, limit)
    return words, chunks, raw


class SentenceEncoder:
    """`encode(sentences) -> [ids]` without special tokens, for any tokenizer; fast for BERT uncased."""

    def __init__(self, tokenizer, cache_words: int = 1_000_000):
        """tokenizer: a `tokenizers.Tokenizer` without truncation or padding."""
        self.tokenizer = tokenizer
        spec = json.loads(tokenizer.to_str())
        self.words = self.chunks = self.raw_chunks = None  # memo tables, for BERT uncased only
        if _is_bert_uncased(spec):
            self.words, self.chunks, self.raw_chunks = _tables(tokenizer, cache_words)

    def __getstate__(self) -> dict:
        # The tables are caches: pickled as their size limit only (the WordPiece model would travel twice,
        # once inside the tokenizer), rebuilt empty in the worker process.
        state = dict(vars(self))
        if self.words is not None:
            state["words"] = state["chunks"] = state["raw_chunks"] = None
            state["cache_limit"] = self.words.limit
        return state

    def __setstate__(self, state: dict) -> None:
        limit = state.pop("cache_limit", None)
        vars(self).update(state)
        if limit is not None:
            self.words, self.chunks, self.raw_chunks = _tables(self.tokenizer, limit)

    @property
    def fast(self) -> bool:
        return self.words is not None

    def encode(self, sentences: list[str]) -> list[list[int]]:
        if self.words is None:
            return self._rust(sentences)
        out: list = [None] * len(sentences)
        slow = []
        get = self.chunks.__getitem__
        for i, sentence in enumerate(sentences):
            if not _UNSAFE.search(sentence):  # printable ASCII: lowercase the sentence, cached chunks
                out[i] = list(chain.from_iterable(map(get, sentence.lower().split())))
            elif _SPLIT_DISAGREES.search(sentence):
                slow.append(i)
            else:  # chunk by chunk: printable-ASCII chunks as above, others through the Rust pipeline
                out[i] = list(chain.from_iterable(self._mixed_chunk(c) for c in sentence.split()))
        if slow:
            for i, ids in zip(slow, self._rust([sentences[i] for i in slow])):
                out[i] = ids
        return out

    def _mixed_chunk(self, chunk: str) -> tuple:
        if chunk.isascii() and chunk.isprintable():
            return self.chunks[chunk.lower()]
        return self.raw_chunks[chunk]

    def _rust(self, sentences: list[str]) -> list[list[int]]:
        if not sentences:
            return []
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [enc.ids for enc in encode(sentences, add_special_tokens=False)]
