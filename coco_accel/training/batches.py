"""Training batches: which documents form each global batch, which two spans each gives, and the collator.

A batch is a pure function of (seed, global step): the epoch's document order is a keyed permutation
of (seed, epoch), every global batch is cut into per-process slices by global rank, and span choice,
random truncation and masking are keyed by (seed, epoch, document). So one process with 8 documents
per step and two with 4 see exactly the same data, and a resumed run sees the batches it would have.
Each batch costs O(batch): the permutation is evaluated at the batch's positions only, never built
for the whole corpus, and a resumed run computes its next batch directly (no replay).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from coco_accel.common.keyed_random import DOC_ORDER, SPAN_CHOICE, TRUNCATE, keyed_permutation, keyed_uniform
from coco_accel.model.packing import host_layout
from coco_accel.training.masking import MaskingError, continuation_table, whole_word_mask
from coco_accel.training.span_store import SpanStore


class DataError(ValueError):
    """Training data that cannot be used; the message names the folder and the fix."""


def load_train_data(train_dir: str, split: str = "train"):
    """Training documents, memory-mapped: a folder written by `python -m coco_accel.preprocess`, or a
    folder of the reference's tokenized JSON lines (`{"spans": [[ids], ...]}` per line)."""
    import datasets

    path = Path(train_dir)
    files: list[str] = []  # the reference format's files, in row order
    if not path.is_dir():
        raise DataError(f"--train_dir {train_dir}: {'a file, not a folder' if path.exists() else 'no such folder'}; "
                        "give the --output_dir of `python -m coco_accel.preprocess`.")
    raw = next((name for name in ("corpus.jsonl", "corpus.jsonl.gz", "collection.tsv") if (path / name).is_file()), None)
    if raw:
        raise DataError(f"--train_dir {train_dir}: holds a raw corpus ({raw}), not spans; preprocess it first: "
                        f"`python -m coco_accel.preprocess --tokenizer MODEL --output_dir SPANS {train_dir}`, then "
                        "--train_dir SPANS.")
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as err:  # pyarrow's errors are OSError (truncated) or ValueError (invalid)
            raise DataError(f"--train_dir {train_dir}: {_damaged_shard(path) or 'cannot be loaded'} ({err}). Re-run "
                            "`python -m coco_accel.preprocess` into a new folder (or copy the folder again).") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"--train_dir {train_dir}: has splits {list(ds)} but no '{split}'.")
            ds = ds[split]
        elif split != "train":
            raise DataError(f"--train_dir {train_dir}: a single dataset, with no '{split}' split.")
    else:
        if split != "train":
            raise DataError(f"--train_dir {train_dir}: the reference's format has no '{split}' split.")
        files = sorted(str(p) for p in path.iterdir() if p.suffix in (".json", ".jsonl") or p.name.endswith(".json.gz"))
        if not files:
            raise DataError(f"--train_dir {train_dir}: neither a folder written by `python -m coco_accel.preprocess` "
                            "nor one holding the reference's tokenized .json files.")
        features = datasets.Features({"spans": datasets.List(datasets.List(datasets.Value("int32")))})
        try:
            ds = datasets.load_dataset("json", data_files=files, split="train", features=features)
        except Exception as err:  # the json builder wraps parse errors in its own types
            raise DataError(f"--train_dir {train_dir}: could not read the reference's tokenized files as "
                            f"{{\"spans\": [[ids], ...]}} lines: {err}") from None
    if "spans" not in ds.column_names:
        raise DataError(f"--train_dir {train_dir}: no 'spans' column (columns: {ds.column_names}).")
    if len(ds) == 0:
        raise DataError(f"--train_dir {train_dir}: holds no documents.")
    if files:
        _check_span_counts(ds, files)  # preprocessing keeps only documents of two spans or more; these may not
    return ds


def _damaged_shard(path: Path) -> Optional[str]:
    """Which Arrow file of a preprocessed folder cannot be read to its end, in words, or None."""
    import pyarrow as pa

    for shard in sorted(path.rglob("*.arrow")):
        try:
            with pa.memory_map(str(shard)) as source:
                pa.ipc.open_stream(source).read_all()
        except (OSError, ValueError):
            return f"the shard {shard} is damaged (cut short or overwritten)"
    return None


def _check_span_counts(ds, files: list[str]) -> None:
    """Every document needs two spans (a span and its sibling); found at load, not when it is drawn hours in.
    Reads only the list offsets of each chunk (no token)."""
    import pyarrow.compute as pc

    start = 0
    for chunk in ds.data.table.column("spans").chunks:
        counts = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
        short = np.nonzero(counts < 2)[0]
        if short.size:
            row = start + int(short[0])
            for name in files:  # the rows come file by file, a line each
                with (gzip.open if name.endswith(".gz") else open)(name, "rb") as fh:
                    lines = sum(1 for line in fh if line.strip())
                if row < lines:
                    raise DataError(f"{name}, document on line {row + 1}: {int(counts[short[0]])} span(s); "
                                    "each document needs at least two (a span and its sibling). Drop such "
                                    f"documents, or preprocess the corpus with `python -m coco_accel.preprocess` "
                                    f"({int((counts < 2).sum())} such documents in this part alone).")
                row -= lines
            raise DataError(f"document #{start + int(short[0])} has fewer than two spans.")
        start += len(chunk)


def check_token_range(ds, vocab_size: int, train_dir: str) -> None:
    """Every token id below the tokenizer's size, for data that does not record its tokenizer (the
    reference's format): one pass over the token columns at start-up, so a wrong vocabulary is an error
    here, on every process alike, and not a failed batch on one of them hours in."""
    import pyarrow.compute as pc

    start = 0
    for chunk in ds.data.table.column("spans").chunks:
        tokens = chunk.flatten().flatten()
        if len(tokens) and pc.max(tokens).as_py() >= vocab_size:
            counts = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
            spans = np.concatenate([[0], np.cumsum(counts)])
            lengths = pc.list_value_length(chunk.flatten()).to_numpy(zero_copy_only=False)
            at = int(np.argmax(tokens.to_numpy(zero_copy_only=False) >= vocab_size))
            span = int(np.searchsorted(np.cumsum(lengths), at, side="right"))
            doc = start + int(np.searchsorted(spans, span, side="right")) - 1
            raise DataError(f"--train_dir {train_dir}: document #{doc} holds token id "
                            f"{pc.max(tokens).as_py()}, beyond the tokenizer's {vocab_size} tokens: it was "
                            "tokenized with another tokenizer. Tokenize it with the model's (`python -m "
                            "coco_accel.preprocess --tokenizer MODEL ...`).")
        start += len(chunk)


@dataclass(frozen=True)
class BatchPlan:
    """Global batches of documents over epochs, and this process's slice of each."""

    num_docs: int
    global_docs: int  # documents per global batch
    seed: int
    drop_last: bool
    world_size: int = 1
    rank: int = 0

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_docs, self.global_docs)
        # A short last batch needs a document for every process; smaller remainders are dropped.
        return full + (1 if (rest >= self.world_size and not self.drop_last) else 0)

    def total_steps(self, num_train_epochs: float, max_steps: int) -> int:
        if max_steps > 0:
            return max_steps
        return max(1, math.ceil(num_train_epochs * self.steps_per_epoch))

    def epoch_order(self, epoch: int, positions: Optional[np.ndarray] = None) -> np.ndarray:
        """The documents at these positions of the epoch's order (all of them when None: O(corpus), for tests)."""
        if positions is None:
            positions = np.arange(self.num_docs)
        return keyed_permutation(positions, self.num_docs, self.seed, epoch, DOC_ORDER)

    def global_batch(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, document indices of the whole global batch at this global step)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_docs
        return epoch, self.epoch_order(epoch, np.arange(start, min(start + self.global_docs, self.num_docs)))

    def local_slice(self, n: int) -> slice:
        """This process's contiguous share of a global batch of n documents, by global rank."""
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def shares(self, n: int) -> list[int]:
        """Every process's document count in a global batch of n, in rank order: known on every host,
        so the step needs no collective to learn them."""
        return [(r + 1) * n // self.world_size - r * n // self.world_size for r in range(self.world_size)]


class SpanCollator:
    """Documents' spans -> two spans each, [CLS] span [SEP], padded to the longest, whole words masked.

    Rows are laid out in document pairs: rows 2d and 2d+1 are document d's two spans.
    """

    def __init__(self, tokenizer, max_seq_length: int, mlm_probability: float, seed: int, whole_words: bool = True):
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None or tokenizer.mask_token_id is None:
            raise DataError("The tokenizer needs [CLS], [SEP] and [MASK] tokens (BERT- or RoBERTa-style).")
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        try:
            self.is_continuation = continuation_table(tokenizer, whole_words)
        except MaskingError as err:
            raise DataError(str(err)) from None
        self.max_tokens = max_seq_length - 2
        self.mlm_probability = mlm_probability
        self.seed = seed

    def pick(self, epoch: int, docs: np.ndarray, span_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Two distinct span positions per document, keyed by (seed, epoch, document)."""
        k = span_counts
        first = np.floor(keyed_uniform(self.seed, epoch, docs, 0, SPAN_CHOICE) * k).astype(np.int64)
        second = np.floor(keyed_uniform(self.seed, epoch, docs, 1, SPAN_CHOICE) * (k - 1)).astype(np.int64)
        second = second + (second >= first)
        return first, second

    def __call__(self, epoch: int, docs: np.ndarray, doc_span_offsets: np.ndarray, span_token_offsets: np.ndarray,
                 tokens: np.ndarray, mask: bool = True) -> dict[str, torch.Tensor]:
        """docs: [n] dataset indices; the rest is the documents' spans in CSR form (see `fetch_spans`).
        mask=False leaves the spans intact (labels all -100): the held-out contrastive signal."""
        n = len(docs)
        counts = np.diff(doc_span_offsets)
        if np.any(counts < 2):
            bad = int(docs[np.argmax(counts < 2)])
            raise DataError(f"document #{bad} has fewer than two spans: re-run `python -m coco_accel.preprocess`.")
        if tokens.size and tokens.max() >= self.vocab_size:
            at = int(np.searchsorted(span_token_offsets, int(np.argmax(tokens >= self.vocab_size)), side="right")) - 1
            bad = int(docs[np.searchsorted(doc_span_offsets, at, side="right") - 1])
            raise DataError(f"document #{bad} holds token id {int(tokens.max())}, beyond the tokenizer's "
                            f"{self.vocab_size} tokens: --train_dir was tokenized with another tokenizer; "
                            "preprocess it with the model's.")
        first, second = self.pick(epoch, docs, counts)
        span_idx = np.stack([first, second], axis=1).reshape(-1) + np.repeat(doc_span_offsets[:-1], 2)
        starts = span_token_offsets[span_idx]
        lengths = span_token_offsets[span_idx + 1] - starts
        slot = np.tile([0, 1], n)
        row_docs = np.repeat(docs, 2)
        too_long = lengths > self.max_tokens
        if too_long.any():  # one random window per over-long span, keyed like everything else
            shift = np.floor(keyed_uniform(self.seed, epoch, row_docs, slot, TRUNCATE)
                             * (lengths - self.max_tokens + 1)).astype(np.int64)
            starts = np.where(too_long, starts + shift, starts)
            lengths = np.minimum(lengths, self.max_tokens)

        rows = 2 * n
        width = int(lengths.max()) + 2
        ids = np.full((rows, width), self.pad_id, dtype=np.int64)
        row_of = np.repeat(np.arange(rows), lengths)
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        ids[row_of, within + 1] = tokens[np.repeat(starts, lengths) + within]
        ids[:, 0] = self.cls_id
        ids[np.arange(rows), lengths + 1] = self.sep_id
        attention = np.arange(width)[None, :] < (lengths + 2)[:, None]
        special = ~attention.copy()
        special[:, 0] = True
        special[np.arange(rows), lengths + 1] = True
        if mask:
            masked, labels = whole_word_mask(ids, special, self.is_continuation,
                                             (np.full(rows, self.seed), np.full(rows, epoch), row_docs, slot),
                                             mlm_probability=self.mlm_probability, mask_token_id=self.mask_id,
                                             vocab_size=self.vocab_size, real_at=(row_of, within + 1), in_place=True)
        else:
            masked, labels = ids, np.full_like(ids, -100)
        return {"input_ids": torch.from_numpy(masked), "attention_mask": torch.from_numpy(attention.astype(np.int64)),
                "labels": torch.from_numpy(labels)}


_HEAP_KEPT_IN: Optional[int] = None  # the process whose allocator was told to keep freed memory


def keep_freed_memory() -> None:
    """Tell glibc's allocator to keep freed blocks instead of returning them to the system at once.

    By default every block over 128 KB is its own mapping, unmapped when freed, so each batch's arrays
    (about 25 MB at 2048 documents) are faulted in page by page anew: ~5,000 page faults, a quarter of
    the batch's time. With mappings only above 32 MB (glibc's maximum for the threshold) and no trimming,
    the heap grows once to its high-water mark and is reused. Elsewhere than glibc this does nothing.
    """
    global _HEAP_KEPT_IN
    if _HEAP_KEPT_IN == os.getpid():
        return
    _HEAP_KEPT_IN = os.getpid()
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    mallopt(m_trim_threshold, 1 << 30)


@dataclass(frozen=True)
class Batch:
    """One process's rows of one global batch, on the host, with what the host knows about them: the step
    and every layer below it read these instead of asking the device (each question would wait for it)."""

    tensors: dict[str, torch.Tensor]  # input_ids, attention_mask, labels: [2 x documents, width], doc pairs
    layout: np.ndarray  # `host_layout` of the rows (lengths, masked slots): packing and length groups plan from it
    step: int  # the global step it belongs to, 0-based (held-out batches: 0)
    global_docs: int  # documents in the whole global batch
    rank_docs: tuple[int, ...]  # every process's documents in it, in rank order

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], step: int, rank_docs: Sequence[int]) -> "Batch":
        return cls(tensors, host_layout(tensors["attention_mask"], tensors["labels"]), step, sum(rank_docs),
                   tuple(rank_docs))

    @property
    def row_counts(self) -> list[int]:
        """Every process's rows (two spans a document): the gather's sizes, known without an exchange."""
        return [2 * n for n in self.rank_docs]

    def pin_memory(self) -> "Batch":
        """The loader's pinning (on a GPU) calls this: the tensors pinned, so their copies are queued."""
        return dataclasses.replace(self, tensors={k: v.pin_memory() for k, v in self.tensors.items()})


class TrainBatches(torch.utils.data.Dataset):
    """Map-style over GLOBAL STEPS: item s is this process's collated batch of global step s."""

    def __init__(self, dataset, plan: BatchPlan, collator: SpanCollator):
        # Only the spans are read: a batch then touches a third of the pages it would with every column.
        self.dataset = dataset.select_columns(["spans"]).with_format("arrow")
        self.store = SpanStore(self.dataset)
        self.plan = plan
        self.collator = collator

    def __len__(self) -> int:
        return 1 << 62  # indexed by step; the sampler bounds it

    def __getitem__(self, step: int) -> Batch:
        keep_freed_memory()  # in whichever process builds batches: the trainer's, or each loader worker
        epoch, global_docs = self.plan.global_batch(step)
        docs = global_docs[self.plan.local_slice(len(global_docs))]
        return Batch.of(self.collator(epoch, docs, *self.store.fetch(docs)), step, self.plan.shares(len(global_docs)))


def make_loader(batches: TrainBatches, start_step: int, total_steps: int, num_workers: int):
    # Its own generator: creating the iterator draws a seed, and drawing it from the global stream
    # would shift dropout after a resume (batches themselves use no torch randomness).
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start_step, total_steps),
                                       num_workers=num_workers, persistent_workers=False,
                                       pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator().manual_seed(batches.plan.seed))
