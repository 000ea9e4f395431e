"""The span rule (the reference's): a document's sentences -> token spans, as a `datasets.map` function.

Sentences are tokenized without special tokens and grouped into spans of at most `max_span_tokens`
tokens, starting a new span before a sentence with probability 0.1; a sentence longer than the limit
is a span of its own. A document is dropped (and counted) when it has fewer than two spans or its
first span has two tokens or fewer. Unlike the reference, the random breaks are keyed by (seed,
corpus, document id), so the output does not depend on `--num_proc`, input order or re-runs.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
from importlib.metadata import version
from itertools import chain
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from coco_accel.common.keyed_random import HELD_OUT, SPAN_BREAK, keyed_uniform
from coco_accel.preprocessing.wordpiece import SentenceEncoder

BREAK_PROBABILITY = 0.1
MAP_BATCH_SIZE = 1024  # documents per datasets.map batch
# The code that turns corpus files into spans (paths in the package): part of both caches' keys, with the
# libraries below.
PIPELINE_SOURCES = ("preprocessing/corpora.py", "common/keyed_random.py", "common/tokenizer_files.py",
                    "preprocessing/breaks.py", "preprocessing/wordpiece.py", "preprocessing/spans.py",
                    "preprocessing/raw_cache.py", "preprocessing/outcomes.py", "preprocess.py")
PIPELINE_LIBRARIES = ("nltk", "tokenizers", "datasets")


@functools.lru_cache(maxsize=None)
def pipeline_key() -> str:
    """A hash of the preprocessing code and the versions of the libraries it relies on. Part of the raw
    and span cache keys, so that a change to either rebuilds them rather than serving data an older
    version built (no version number to remember to bump)."""
    h = hashlib.blake2b(digest_size=16)
    for name in PIPELINE_SOURCES:
        h.update((Path(__file__).parents[1] / name).read_bytes())
    h.update(repr([version(lib) for lib in PIPELINE_LIBRARIES]).encode())
    return h.hexdigest()


def key64(text: str) -> int:
    """Stable signed 64-bit key of a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def group_spans(sentences: list[list[int]], breaks: Sequence[bool], max_tokens: int) -> list[list[int]]:
    """Group tokenized sentences into spans. breaks[i] is True where a span may start before sentence i."""
    spans: list[list[int]] = []
    current: list[int] = []
    for sent, brk in zip(sentences, breaks):
        if not sent:
            continue
        if current and (brk or len(current) + len(sent) > max_tokens):
            spans.append(current)
            current = []
        current.extend(sent)
    if current:
        spans.append(current)
    return spans


def drop_reason(spans: list[list[int]]) -> str:
    if len(spans) < 2:
        return "fewer_than_two_spans"
    if len(spans[0]) <= 2:
        return "short_first_span"
    return ""


class SpanBuilder:
    """The `datasets.map` function: a batch of documents -> spans, drop reason, id key, held-out flag."""

    def __init__(self, tokenizer, splitter, *, max_span_tokens: int, seed: int, eval_fraction: float = 0.0,
                 id_type: str = "int32"):
        self.id_type = id_type  # the Arrow value type of the spans' token ids
        self.splitter = splitter
        self.max_span_tokens = max_span_tokens
        self.seed = seed
        self.eval_fraction = eval_fraction
        from coco_accel.preprocessing import breaks  # nltk is imported on first use only

        self.encoder = SentenceEncoder(tokenizer)  # a tokenizers.Tokenizer without truncation or padding
        self._sentences = breaks.punkt_sentences(splitter)

    def __getstate__(self) -> dict:
        # What `datasets` pickles for each worker process: the configuration, not the memo tables (which
        # fill up with use) nor what is rebuilt from the configuration. As one blob of the C pickler,
        # because datasets pickles with dill, in pure Python, several times slower on the Punkt tables.
        from coco_accel.preprocessing import breaks

        state = dict(vars(self))
        state["splitter"] = breaks.forget_breaks(self.splitter)
        del state["_sentences"]
        return {"blob": pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)}

    def __setstate__(self, state: dict) -> None:
        from coco_accel.preprocessing import breaks

        vars(self).update(pickle.loads(state["blob"]))
        breaks.remember_breaks(self.splitter)
        self._sentences = breaks.punkt_sentences(self.splitter)

    def fingerprint(self, dataset_fingerprint: str, features) -> str:
        """The `datasets` cache key of mapping a dataset with this builder: the input dataset's key, the
        span settings, the tokenizer's full definition, the Punkt parameters and `pipeline_key`. Given to
        `map` as new_fingerprint, so that datasets does not pickle the whole builder (vocabulary and
        Punkt tables) to hash it on every run."""
        params = self.splitter._params
        h = hashlib.blake2b(digest_size=16)
        for part in (pipeline_key(), dataset_fingerprint, repr(features), self.id_type,
                     repr((self.max_span_tokens, self.seed, self.eval_fraction, BREAK_PROBABILITY, MAP_BATCH_SIZE)),
                     self.encoder.tokenizer.to_str(),
                     repr((sorted(params.abbrev_types), sorted(params.collocations), sorted(params.sent_starters),
                           sorted(params.ortho_context.items())))):
            h.update(part.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    def _sentence_tokens(self, texts: list[str]) -> list[list[list[int]]]:
        """Per document, the token ids of each Punkt sentence (no special tokens), all sentences of the
        batch at once (coco_accel.preprocessing.wordpiece: the tokenizer's exact ids)."""
        split = self._sentences  # == self.splitter.tokenize
        sentences = [split(t) if t else [] for t in texts]
        ids = self.encoder.encode([s for doc in sentences for s in doc])
        out, pos = [], 0
        for doc in sentences:
            out.append(ids[pos:pos + len(doc)])
            pos += len(doc)
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        """A batch as an Arrow table in, the same rows out: the bookkeeping columns passed through as they
        are, title and text replaced by spans (list<list<id>>), drop reason, id key and held-out flag."""
        batch = {k: table.column(k).to_pylist() for k in ("title", "text", "reject", "corpus", "doc_id")}
        texts = [("" if reject else f"{title.strip()} {text.strip()}".strip() if title else text.strip())
                 for title, text, reject in zip(batch["title"], batch["text"], batch["reject"])]
        tokens = self._sentence_tokens(texts)
        corpus_keys = np.array([key64(c) for c in batch["corpus"]], dtype=np.int64)
        doc_keys = np.array([key64(d) for d in batch["doc_id"]], dtype=np.int64)
        heldout = keyed_uniform(self.seed, corpus_keys, doc_keys, HELD_OUT) < self.eval_fraction
        # the break draw before sentence i of a document: keyed by (seed, corpus, doc id, i), all at once
        counts = np.array([len(t) for t in tokens], dtype=np.int64)
        doc_of = np.repeat(np.arange(len(tokens)), counts)
        index = np.arange(len(doc_of)) - np.repeat(np.cumsum(counts) - counts, counts)
        breaks = (keyed_uniform(self.seed, corpus_keys[doc_of], doc_keys[doc_of], index, SPAN_BREAK)
                  < BREAK_PROBABILITY).tolist()
        kept_spans, spans_per_doc, out_drop = [], [], []
        start = 0
        for toks, reject in zip(tokens, batch["reject"]):
            doc_breaks, start = breaks[start:start + len(toks)], start + len(toks)
            spans = [] if reject else group_spans(toks, doc_breaks, self.max_span_tokens)
            reason = drop_reason(spans) if not reject else ""
            if reason:
                spans = []
            kept_spans.extend(spans)
            spans_per_doc.append(len(spans))
            out_drop.append(reason)
        kept = [c for c in table.column_names if c not in ("title", "text")]
        return table.select(kept).append_column("spans", self._nested(kept_spans, spans_per_doc)).append_column(
            "drop", pa.array(out_drop, pa.string())).append_column("key", pa.array(doc_keys)).append_column(
            "heldout", pa.array(heldout))

    def _nested(self, spans: list[list[int]], spans_per_doc: list[int]):
        """list<list<id>> per document, built from flat arrays (no Python-object conversion per token)."""
        span_lengths = np.fromiter(map(len, spans), dtype=np.int32, count=len(spans))
        values = pa.array(np.fromiter(chain.from_iterable(spans), dtype=np.int64, count=int(span_lengths.sum()))
                          .astype(self.id_type))
        inner = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(span_lengths)]).astype(np.int32)),
                                         values)
        doc_offsets = np.concatenate([[0], np.cumsum(spans_per_doc)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(doc_offsets), inner)
