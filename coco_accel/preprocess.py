"""`python -m coco_accel.preprocess`: corpora -> sentences -> token spans -> an Arrow dataset of documents.

Each corpus is read into cached Arrow files (coco_accel.preprocessing.raw_cache), mapped to spans with
`datasets.map` (coco_accel.preprocessing.spans: the span rule), counted (coco_accel.preprocessing.outcomes) and saved as sharded
Arrow with stats.json and rejects.jsonl beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from coco_accel.common.files import output_folder_problem
from coco_accel.common.tokenizer_files import tokenizer_folder_problem, vocab_sha256
from coco_accel.preprocessing import corpora
from coco_accel.preprocessing.outcomes import add_counts, empty_counts, outcomes, write_rejects
from coco_accel.preprocessing.raw_cache import read_corpus
from coco_accel.preprocessing.spans import MAP_BATCH_SIZE, SpanBuilder
from coco_accel.preprocessing.wordpiece import load_backend_tokenizer

logger = logging.getLogger("coco_accel.preprocess")


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
    from coco_accel.preprocessing import breaks

    sources = corpora.discover(list(inputs))
    problem = tokenizer_folder_problem(str(tokenizer_name))
    if problem:
        raise corpora.InputError(f"--tokenizer {tokenizer_name}: {problem}. Give the folder of the model you will "
                                 "train (it holds tokenizer.json or vocab.txt).")
    tokenizer = load_backend_tokenizer(str(tokenizer_name))
    splitter, split_source = breaks.load_sentence_splitter()
    logger.info("Sentence splitter: %s", split_source)
    id_type = "uint16" if tokenizer.get_vocab_size(with_added_tokens=True) <= np.iinfo(np.uint16).max else "int32"
    builder = SpanBuilder(tokenizer, splitter, max_span_tokens=max_span_tokens, seed=seed, eval_fraction=eval_fraction,
                          id_type=id_type)

    out = Path(output_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {"total": empty_counts(), "corpora": {}}
    # rejects.jsonl is written under a temporary name: a run that fails on a damaged input leaves the
    # folder as it found it (a previous output's rejects.jsonl included)
    rejects = out / ".rejects.jsonl.tmp"
    try:
        train_parts, eval_parts = _map_corpora(sources, builder, stats, rejects, num_proc=num_proc,
                                               cache_dir=cache_dir, min_shard_bytes=min_shard_bytes)
    except BaseException:
        rejects.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise

    _remove_previous_output(out)
    _save(out, train_parts, eval_parts if eval_fraction > 0 else None, num_shards)
    os.replace(rejects, out / "rejects.jsonl")
    stats.update({"tokenizer": str(tokenizer_name),
                  "tokenizer_vocab_sha256": vocab_sha256(tokenizer.get_vocab(with_added_tokens=True)),
                  "tokenizer_vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
                  "sentence_splitter": split_source, "seed": seed,
                  "max_span_tokens": max_span_tokens, "eval_fraction": eval_fraction,
                  "inputs": [s.path for s in sources]})
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _map_corpora(sources: list, builder: SpanBuilder, stats: dict, rejects: Path, *, num_proc: int,
                 cache_dir: Optional[str], min_shard_bytes: int) -> tuple[list, list]:
    """Every corpus mapped to spans, its counts added to `stats` and its rejects written to `rejects`:
    (the kept training parts, the held-out parts), one of each per corpus."""
    train_parts, eval_parts = [], []
    with open(rejects, "w", encoding="utf-8") as rejects_file:
        for corpus in dict.fromkeys(s.corpus for s in sources):
            group = [s for s in sources if s.corpus == corpus]
            built, outcome = _spans_of_corpus(corpus, group, builder, num_proc=num_proc, cache_dir=cache_dir,
                                              min_shard_bytes=min_shard_bytes)
            stats["corpora"][corpus] = outcome.counts
            add_counts(stats["total"], outcome.counts)
            write_rejects(built, outcome, rejects_file)
            columns = ["doc_id", "corpus", "spans"]
            train_parts.append(built.select(np.nonzero(outcome.kept & ~outcome.heldout)[0]).select_columns(columns))
            eval_parts.append(built.select(np.nonzero(outcome.kept & outcome.heldout)[0]).select_columns(columns))
    return train_parts, eval_parts


def _spans_of_corpus(corpus: str, group: list, builder: SpanBuilder, *, num_proc: int, cache_dir: Optional[str],
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
    return built, outcomes(built)


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
    for name in ("state.json", "dataset_info.json", "dataset_dict.json"):
        (out / name).unlink(missing_ok=True)
    for arrow in out.glob("data-*.arrow"):
        arrow.unlink()
    for split in ("train", "eval"):
        if (out / split / "state.json").is_file():
            shutil.rmtree(out / split)


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
