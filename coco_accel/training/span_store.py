"""Documents' spans read straight from the Arrow buffers of a span dataset, in CSR form, at a cost that
grows with the batch, not with the corpus or its number of record batches."""

from __future__ import annotations

import ctypes
import os

import numpy as np


def fetch_spans(dataset, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Documents' spans straight from Arrow, in CSR form, without Python lists.

    Returns (doc_span_offsets [n+1], span_token_offsets [S+1], tokens [T] int64). An arrow-formatted
    dataset is read as it is (formatting it copies the dataset object: a tenth of a batch's time).
    """
    if dataset.format["type"] != "arrow":
        dataset = dataset.with_format("arrow")
    table = dataset[docs.tolist()]
    col = table.column("spans").combine_chunks()  # list<list<int>>
    outer = col.offsets.to_numpy()
    doc_off = (outer - outer[0]).astype(np.int64)
    inner_arr = col.flatten()
    inner = inner_arr.offsets.to_numpy()
    span_off = (inner - inner[0]).astype(np.int64)
    tokens = inner_arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return doc_off, span_off, tokens


class SpanStore:
    """Documents' spans gathered straight from the Arrow buffers of the spans column, in a few numpy
    operations per batch, whatever the corpus size or the number of record batches.

    `datasets` gathers rows one by one (a slice of a record batch per index, then a concatenation), a cost
    per document that dominated the data path (docs/data_at_scale.md). Here every record batch's three buffers
    (document -> span offsets, span -> token offsets, tokens) are addressed as positions in one numpy
    view of the process's memory: the buffers are memory-mapped (or in memory) and never move while
    the table is held, and a batch reads only its documents' bytes. The view is built per process (a
    data-loader worker builds its own) in O(record batches). Tables of another layout (64-bit offsets,
    an indices mapping) are read through `fetch_spans`.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self._views = None  # (pid, arrays): rebuilt in each process, never pickled

    def __getstate__(self):
        return {"dataset": self.dataset, "_views": None}

    def _build(self):
        import pyarrow as pa

        if self.dataset._indices is not None:
            return None
        chunks = [c for c in self.dataset.data.table.column("spans").chunks if len(c)]
        if not chunks:
            return None
        kinds = []  # per record batch: (outer offsets, inner offsets, tokens) buffers with their element offsets
        for chunk in chunks:
            inner = chunk.values
            if not (pa.types.is_list(chunk.type) and pa.types.is_list(inner.type)):
                return None
            tokens = inner.values
            token_type = tokens.type.to_pandas_dtype()
            if token_type not in (np.uint16, np.int32):
                return None
            kinds.append(((chunk.buffers()[1], chunk.offset), (inner.buffers()[1], inner.offset),
                          (tokens.buffers()[1], tokens.offset)))
        token_dtype = np.dtype(chunks[0].values.values.type.to_pandas_dtype())
        if any(np.dtype(c.values.values.type.to_pandas_dtype()) != token_dtype for c in chunks):
            return None
        buffers = [b for k in kinds for b, _ in k]
        base = min(b.address for b in buffers) & ~7
        end = max(b.address + b.size for b in buffers)
        end += -(end - base) % 8
        if any(b.address % 4 for b, _ in (k[0] for k in kinds)) or any(b.address % 4 for b, _ in (k[1] for k in kinds)) \
                or any(b.address % token_dtype.itemsize for b, _ in (k[2] for k in kinds)):
            return None
        memory = (ctypes.c_uint8 * (end - base)).from_address(base)  # nothing is read until indexed
        offsets = np.frombuffer(memory, dtype=np.int32)
        values = np.frombuffer(memory, dtype=token_dtype)

        def positions(which: int, itemsize: int) -> np.ndarray:
            return np.array([(k[which][0].address - base) // itemsize + k[which][1] for k in kinds], dtype=np.int64)

        _map_pages(offsets, [k[w][0] for k in kinds for w in (0, 1)], base)
        starts = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
        return {"pid": os.getpid(), "offsets": offsets, "values": values, "starts": starts,
                "outer": positions(0, 4), "inner": positions(1, 4), "tokens": positions(2, token_dtype.itemsize),
                "keep": (chunks, memory)}

    def fetch(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As `fetch_spans`: (doc_span_offsets [n+1], span_token_offsets [S+1], tokens [T] int64)."""
        if self._views is None or (self._views and self._views["pid"] != os.getpid()):
            self._views = self._build() or {}
        v = self._views
        if not v:
            return fetch_spans(self.dataset, docs)
        docs = np.asarray(docs, dtype=np.int64)
        if docs.size and (docs.min() < 0 or docs.max() >= v["starts"][-1]):
            raise IndexError(f"document index out of range 0..{v['starts'][-1] - 1}")
        offsets = v["offsets"]
        batch = np.searchsorted(v["starts"], docs, side="right") - 1  # the record batch of each document
        outer = v["outer"][batch] + (docs - v["starts"][batch])
        first, counts = offsets[outer], offsets[outer + 1] - offsets[outer]
        span_batch = np.repeat(batch, counts)
        span = v["inner"][span_batch] + _ranges(first, counts)
        token_first, lengths = offsets[span], offsets[span + 1] - offsets[span]
        tokens = v["values"][np.repeat(v["tokens"][span_batch], lengths) + _ranges(token_first, lengths)]
        return (np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), tokens.astype(np.int64))


_WINDOW = 1 << 16  # bytes the kernel maps around a read fault of a file page (fault_around_bytes' default)


def _map_pages(view: np.ndarray, buffers: list, base: int) -> None:
    """Read one value in each 64 KB window of these buffers, so that this process's page tables map
    them: the offsets are a few bytes per document (a tenth of the data) but each record batch's lie
    on their own pages, and a fresh worker would otherwise take page faults for nearly every document
    of its first batches. A few thousand faults here instead of several per document later."""
    lo = np.array([b.address - base for b in buffers], dtype=np.int64)
    hi = lo + np.array([b.size for b in buffers], dtype=np.int64)
    inner_first = lo // _WINDOW + 1  # window boundaries inside each buffer
    inner_count = np.maximum(0, (hi - 1) // _WINDOW - inner_first + 1)
    points = np.concatenate([lo[hi > lo], _ranges(inner_first, inner_count) * _WINDOW])
    _, one_each = np.unique(points // _WINDOW, return_index=True)
    int(view[points[one_each] // view.itemsize].sum())


def _ranges(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of arange(first[i], first[i] + counts[i]) over i."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    return np.repeat(first.astype(np.int64) - (np.cumsum(counts) - counts), counts) + np.arange(total)
