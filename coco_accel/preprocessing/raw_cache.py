"""Corpus files -> cached Arrow files (one per shard), memory-mapped as one dataset per corpus."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

from coco_accel.preprocessing import corpora
from coco_accel.preprocessing.spans import pipeline_key


def _raw_cache_file(shard: corpora.Shard, cache_dir: Path) -> Path:
    key = json.dumps([pipeline_key(), list(shard.fingerprint), shard.start, shard.end, shard.first_line])
    return cache_dir / f"raw-{hashlib.blake2b(key.encode(), digest_size=12).hexdigest()}.arrow"


def _write_raw(shard: corpora.Shard, path: Path, batch_rows: int = 8192) -> None:
    """Read one shard into an Arrow file, in batches of columns (no per-document Arrow conversion);
    written under a temporary name and renamed, so an interrupted run never leaves a partial cache."""
    from datasets.arrow_writer import ArrowWriter

    features = _raw_features()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
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
    except BaseException:  # a damaged input file (InputError) or an interruption: no partial cache file
        tmp.unlink(missing_ok=True)
        raise
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
