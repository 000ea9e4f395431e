"""Corpora -> sentences -> token spans -> an Arrow dataset of documents, with `datasets.map`; and its CLI.

Span rule (the reference's): sentences are tokenized without special tokens and grouped into spans
of at most `max_span_tokens` tokens, starting a new span before a sentence with probability 0.1; a
sentence longer than the limit is a span of its own. A document is dropped (and counted) when it
has fewer than two spans or its first span has two tokens or fewer. Unlike the reference, the
random breaks are keyed by (seed, corpus, document id), so the output does not depend on
`--num_proc`, input order or re-runs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import pickle
import sys
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from coco_accel import corpora
from coco_accel.masking import keyed_uniform

logger = logging.getLogger("coco_accel.preprocess")

SPAN_BREAK, HELD_OUT = 11, 12  # keyed-random purpose tags, distinct from the training ones
BREAK_PROBABILITY = 0.1
MAP_BATCH_SIZE = 1024  # documents per datasets.map batch
# The code that turns corpus files into spans: part of both caches' keys, with the libraries below.
PIPELINE_SOURCES = ("corpora.py", "masking.py", "breaks.py", "wordpiece.py", "preprocess.py")
PIPELINE_LIBRARIES = ("nltk", "tokenizers", "datasets")


@functools.lru_cache(maxsize=None)
def pipeline_key() -> str:
    """A hash of the preprocessing code and the versions of the libraries it relies on. Part of the raw
    and span cache keys, so that a change to either rebuilds them rather than serving data an older
    version built (no version number to remember to bump)."""
    from importlib.metadata import version

    h = hashlib.blake2b(digest_size=16)
    for name in PIPELINE_SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    h.update(repr([version(lib) for lib in PIPELINE_LIBRARIES]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# spans


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

    def __init__(self, tokenizer, splitter, max_span_tokens: int, seed: int, eval_fraction: float = 0.0,
                 id_type: str = "int32"):
        self.id_type = id_type  # the Arrow value type of the spans' token ids
        self.splitter = splitter
        self.max_span_tokens = max_span_tokens
        self.seed = seed
        self.eval_fraction = eval_fraction
        from coco_accel import breaks  # nltk is imported on first use only
        from coco_accel.wordpiece import SentenceEncoder

        self.encoder = SentenceEncoder(tokenizer)  # a tokenizers.Tokenizer without truncation or padding
        self._sentences = breaks.punkt_sentences(splitter)

    def __getstate__(self) -> dict:
        # What `datasets` pickles for each worker process: the configuration, not the memo tables (which
        # fill up with use) nor what is rebuilt from the configuration. As one blob of the C pickler,
        # because datasets pickles with dill, in pure Python, several times slower on the Punkt tables.
        from coco_accel import breaks

        state = dict(vars(self))
        state["splitter"] = breaks.forget_breaks(self.splitter)
        del state["_sentences"]
        return {"blob": pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)}

    def __setstate__(self, state: dict) -> None:
        from coco_accel import breaks

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
        batch at once (coco_accel.wordpiece: the tokenizer's exact ids)."""
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


# ---------------------------------------------------------------------------------------------------------
# accounting (on Arrow columns: memory stays bounded at MS MARCO scale)


@dataclass
class Outcomes:
    """Per-document outcome of one corpus as compact arrays (no Python string per document)."""

    rejected: np.ndarray  # bool: a reader reject or a duplicate id
    dropped: np.ndarray  # bool: too few / too short spans
    heldout: np.ndarray  # bool
    duplicate: np.ndarray  # bool (subset of rejected)
    counts: dict  # the stats object for this corpus

    @property
    def kept(self) -> np.ndarray:
        return ~self.rejected & ~self.dropped


def _outcomes(built) -> Outcomes:
    """Outcomes from Arrow columns with pyarrow compute; memory stays bounded at MS MARCO scale."""
    import pyarrow.compute as pc

    table = built.with_format("arrow")[:]
    reject_col, drop_col = table.column("reject"), table.column("drop")
    reader_reject = pc.not_equal(reject_col, "").to_numpy(zero_copy_only=False)
    # Later copies of a document id become rejects: ids key the randomness and the evaluation.
    keys = table.column("key").to_numpy()
    candidates = np.nonzero(~reader_reject)[0]
    _, first = np.unique(keys[candidates], return_index=True)
    duplicate = np.zeros(len(keys), dtype=bool)
    duplicate[candidates] = True
    duplicate[candidates[first]] = False
    rejected = reader_reject | duplicate
    dropped = ~rejected & pc.not_equal(drop_col, "").to_numpy(zero_copy_only=False)
    heldout = table.column("heldout").to_numpy(zero_copy_only=False)

    def reasons(col, mask) -> dict:
        if not mask.any():
            return {}
        counts = pc.value_counts(pc.filter(col, mask)).to_pylist()
        return {c["values"]: int(c["counts"]) for c in counts}

    by_reject = reasons(reject_col, reader_reject)
    if duplicate.any():
        by_reject["duplicate_id"] = int(duplicate.sum())
    kept = ~rejected & ~dropped
    counts = {"read": int(len(keys)), "kept": int(kept.sum()), "dropped": int(dropped.sum()),
              "rejected": int(rejected.sum()), "held_out": int((kept & heldout).sum()),
              "dropped_by_reason": dict(sorted(reasons(drop_col, dropped).items())),
              "rejected_by_reason": dict(sorted(by_reject.items()))}
    return Outcomes(rejected, dropped, heldout, duplicate, counts)


def _empty_counts() -> dict:
    return {"read": 0, "kept": 0, "dropped": 0, "rejected": 0, "held_out": 0, "dropped_by_reason": {},
            "rejected_by_reason": {}}


def _add_counts(total: dict, part: dict) -> None:
    for key in ("read", "kept", "dropped", "rejected", "held_out"):
        total[key] += part[key]
    for key in ("dropped_by_reason", "rejected_by_reason"):
        for reason, n in part[key].items():
            total[key][reason] = total[key].get(reason, 0) + n


# ---------------------------------------------------------------------------------------------------------
# the whole job


def preprocess(
    inputs: Sequence[str],
    tokenizer_name: str,
    output_dir: str,
    *,
    num_proc: int = 1,
    seed: int = 42,
    max_span_tokens: int = 30,
    num_shards: Optional[int] = None,
    cache_dir: Optional[str] = None,
    eval_fraction: float = 0.0,
    min_shard_bytes: int = 8 << 20,
) -> dict:
    """Run the pipeline; returns the stats written to OUT/stats.json.

    Each corpus is read into its own cached Arrow dataset and mapped to spans (one progress bar
    each); a re-run on unchanged input reuses the `datasets` cache.
    """
    from coco_accel import breaks
    from coco_accel.wordpiece import load_backend_tokenizer, tokenizer_folder_problem, vocab_sha256

    sources = corpora.discover(list(inputs))
    problem = tokenizer_folder_problem(str(tokenizer_name))
    if problem:
        raise corpora.InputError(f"--tokenizer {tokenizer_name}: {problem}. Give the folder of the model you will "
                                 "train (it holds tokenizer.json or vocab.txt).")
    tokenizer = load_backend_tokenizer(str(tokenizer_name))
    splitter, split_source = breaks.load_sentence_splitter()
    logger.info("Sentence splitter: %s", split_source)
    id_type = "uint16" if tokenizer.get_vocab_size(with_added_tokens=True) <= np.iinfo(np.uint16).max else "int32"
    builder = SpanBuilder(tokenizer, splitter, max_span_tokens, seed, eval_fraction, id_type)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = _empty_counts()
    stats: dict = {"total": total, "corpora": {}}
    train_parts, eval_parts = [], []
    with open(out / "rejects.jsonl", "w", encoding="utf-8") as rejects_file:
        for corpus in dict.fromkeys(s.corpus for s in sources):
            group = [s for s in sources if s.corpus == corpus]
            built, outcome = _spans_of_corpus(corpus, group, builder, num_proc, cache_dir, min_shard_bytes)
            stats["corpora"][corpus] = outcome.counts
            _add_counts(total, outcome.counts)
            _write_rejects(built, outcome, rejects_file)
            columns = ["doc_id", "corpus", "spans"]
            train_parts.append(built.select(np.nonzero(outcome.kept & ~outcome.heldout)[0]).select_columns(columns))
            eval_parts.append(built.select(np.nonzero(outcome.kept & outcome.heldout)[0]).select_columns(columns))

    _remove_previous_output(out)
    _save(out, train_parts, eval_parts if eval_fraction > 0 else None, num_shards)
    stats.update({"tokenizer": str(tokenizer_name),
                  "tokenizer_vocab_sha256": vocab_sha256(tokenizer.get_vocab(with_added_tokens=True)),
                  "tokenizer_vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
                  "sentence_splitter": split_source, "seed": seed,
                  "max_span_tokens": max_span_tokens, "eval_fraction": eval_fraction,
                  "inputs": [s.path for s in sources]})
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _spans_of_corpus(corpus: str, group: list, builder: SpanBuilder, num_proc: int, cache_dir: Optional[str],
                     min_shard_bytes: int):
    """One corpus's files read (cached) and mapped to spans: (the mapped dataset, its outcomes)."""
    import datasets

    logger.info("Corpus %s: %s", corpus, ", ".join(s.path for s in group))
    raw = read_corpus(corpora.shards(group, num_proc, min_shard_bytes), cache_dir, num_proc)
    features = raw.features.copy()
    del features["title"], features["text"]  # not needed after this: the cache keeps ids, not text twice
    features.update({"spans": datasets.List(datasets.List(datasets.Value(builder.id_type))),
                     "drop": datasets.Value("string"), "key": datasets.Value("int64"),
                     "heldout": datasets.Value("bool")})
    built = raw.with_format("arrow").map(builder, batched=True, batch_size=MAP_BATCH_SIZE, features=features,
                                         num_proc=num_proc if num_proc > 1 else None,
                                         new_fingerprint=builder.fingerprint(raw._fingerprint, features),
                                         desc=f"Spans: {corpus}").with_format(None)
    return built, _outcomes(built)


def _save(out: Path, train_parts: list, eval_parts: Optional[list], num_shards: Optional[int]) -> None:
    """The kept spans as sharded Arrow (a DatasetDict with an eval split when documents were held out)."""
    import datasets

    train = datasets.concatenate_datasets(train_parts)
    shards = min(num_shards or max(1, len(train) // 500_000 + 1), max(1, len(train)))
    if eval_parts is not None:
        result = datasets.DatasetDict({"train": train, "eval": datasets.concatenate_datasets(eval_parts)})
        result.save_to_disk(str(out), num_shards={"train": shards, "eval": 1})
    else:
        train.save_to_disk(str(out), num_shards=shards)


def _remove_previous_output(out: Path) -> None:
    """A re-run into the same folder must not leave the previous layout behind (a single dataset's
    state.json next to a new train/eval split would be loaded instead of it)."""
    import shutil

    for name in ("state.json", "dataset_info.json", "dataset_dict.json"):
        (out / name).unlink(missing_ok=True)
    for arrow in out.glob("data-*.arrow"):
        arrow.unlink()
    for split in ("train", "eval"):
        if (out / split / "state.json").is_file():
            shutil.rmtree(out / split)


# ---------------------------------------------------------------------------------------------------------
# reading: corpus files -> cached Arrow files (one per shard), memory-mapped

def _raw_cache_file(shard: corpora.Shard, cache_dir: Path) -> Path:
    key = json.dumps([pipeline_key(), list(shard.fingerprint), shard.start, shard.end, shard.first_line])
    return cache_dir / f"raw-{hashlib.blake2b(key.encode(), digest_size=12).hexdigest()}.arrow"


def _write_raw(shard: corpora.Shard, path: Path, batch_rows: int = 8192) -> None:
    """Read one shard into an Arrow file, in batches of columns (no per-document Arrow conversion);
    written under a temporary name and renamed, so an interrupted run never leaves a partial cache."""
    from datasets.arrow_writer import ArrowWriter

    features = _raw_features()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with ArrowWriter(features=features, path=str(tmp)) as writer:
        columns: dict = {k: [] for k in features}
        for row in corpora.read_rows(shard.source, shard.start, shard.end, shard.first_line):
            for k, values in columns.items():
                values.append(row[k])
            if len(columns["line"]) >= batch_rows:
                writer.write_batch(columns)
                columns = {k: [] for k in features}
        if columns["line"]:
            writer.write_batch(columns)
        writer.finalize()
    os.replace(tmp, path)


def read_corpus(parts: list[corpora.Shard], cache_dir: Optional[str], num_proc: int):
    """The rows of a corpus's shards as one memory-mapped dataset. Each shard's Arrow file is cached
    under a key of its file's path, size and mtime, so a re-run on unchanged input reads nothing and
    `datasets` finds the same fingerprints (and the cached spans) again."""
    import datasets

    folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "coco_accel_raw"
    folder.mkdir(parents=True, exist_ok=True)
    files = [_raw_cache_file(shard, folder) for shard in parts]
    todo = [(shard, path) for shard, path in zip(parts, files) if not path.exists()]
    if len(todo) > 1 and num_proc > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(num_proc, len(todo)), mp_context=multiprocessing.get_context("fork")) as pool:
            for done in [pool.submit(_write_raw, shard, path) for shard, path in todo]:
                done.result()
    else:
        for shard, path in todo:
            _write_raw(shard, path)
    parts_ds = [datasets.Dataset.from_file(str(path)) for path in files]
    return parts_ds[0] if len(parts_ds) == 1 else datasets.concatenate_datasets(parts_ds)


def _raw_features():
    import datasets

    return datasets.Features({**{k: datasets.Value("string") for k in
                                 ("corpus", "doc_id", "title", "text", "file", "detail", "reject")},
                              "line": datasets.Value("int64")})


def _write_rejects(built, outcome: Outcomes, fh) -> None:
    idx = np.nonzero(outcome.rejected)[0]
    if len(idx) == 0:
        return
    rows = built.select(idx).select_columns(["corpus", "doc_id", "file", "line", "reject", "detail"])
    for i, row in zip(idx, rows):
        row["reason"] = row.pop("reject")
        if outcome.duplicate[i]:
            row["reason"], row["detail"] = "duplicate_id", "the same id appears earlier in this corpus"
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coco_accel.preprocess",
                                description="Corpora -> span datasets for coco_accel/train.py.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="BEIR dataset folder, MS MARCO collection(.tsv), or JSON-lines file (.gz allowed).")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer folder (the model you will train).")
    p.add_argument("--output_dir", required=True, help="Where the dataset, stats.json and rejects.jsonl go.")
    p.add_argument("--corpora", default=None, help="Corpus-list YAML (e.g. configs/coco_corpora.yaml), read "
                   "under --corpus_root, in addition to any INPUTs.")
    p.add_argument("--corpus_root", default=".", help="Folder holding the corpora named by --corpora.")
    p.add_argument("--skip_missing", action="store_true", help="Proceed without corpora of --corpora that are absent.")
    p.add_argument("--num_proc", type=int, default=1, help="Processes for datasets.map.")
    p.add_argument("--seed", type=int, default=42, help="Keys the random span breaks and the held-out sample.")
    p.add_argument("--max_span_tokens", type=int, default=30, help="Longest span from grouped sentences.")
    p.add_argument("--eval_fraction", type=float, default=0.0,
                   help="Share of each corpus's kept documents held out in an 'eval' split.")
    p.add_argument("--num_shards", type=int, default=None, help="Arrow shards written (default: by size).")
    p.add_argument("--cache_dir", default=None, help="datasets cache folder (default: the HF datasets cache).")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    problem = _argument_problem(args)
    if problem:
        logger.error("%s", problem)
        return 2
    try:
        inputs = list(args.inputs)
        if args.corpora:
            inputs += corpora.resolve_recipe(args.corpora, args.corpus_root, args.skip_missing)[0]
        if not inputs:
            logger.error("Nothing to read: give INPUT paths or --corpora.")
            return 2
        stats = preprocess(inputs, args.tokenizer, args.output_dir, num_proc=args.num_proc, seed=args.seed,
                           max_span_tokens=args.max_span_tokens, num_shards=args.num_shards,
                           cache_dir=args.cache_dir, eval_fraction=args.eval_fraction)
    except corpora.InputError as err:
        logger.error("%s", err)
        return 2
    t = stats["total"]
    logger.info("Documents: read %d, kept %d (%d held out), dropped %d %s, rejected %d %s -> %s", t["read"],
                t["kept"], t["held_out"], t["dropped"], t["dropped_by_reason"], t["rejected"],
                t["rejected_by_reason"], args.output_dir)
    if t["kept"] == 0:
        logger.error("No document has two spans: nothing to train on. See %s/stats.json (and rejects.jsonl).",
                     args.output_dir)
        return 2
    return 0


def _argument_problem(args) -> Optional[str]:
    """What is wrong with the command line, before anything is read (None when nothing is)."""
    from coco_accel.files import output_folder_problem

    for flag, value in (("--num_proc", args.num_proc), ("--max_span_tokens", args.max_span_tokens)):
        if value < 1:
            return f"{flag} must be at least 1, got {value}."
    if args.num_shards is not None and args.num_shards < 1:
        return f"--num_shards must be at least 1 (or left out: by size), got {args.num_shards}."
    if not 0.0 <= args.eval_fraction < 1.0:
        return f"--eval_fraction must be in [0, 1), got {args.eval_fraction}."
    return output_folder_problem("--output_dir", args.output_dir)


if __name__ == "__main__":
    sys.exit(main())
