"""The host side of packed rows and length groups: from a batch's CPU layout (lengths and masked
slots), where every span goes, which positions the last layers compute and which rows form a group.
Planned on the host so that the step never waits for the device to learn what it holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch


def auto_call_cost(device: torch.device) -> int:
    """Padding tokens one more encoder call is worth. On a GPU each call pays a fixed host-dispatch cost
    that is worth thousands of tokens of arithmetic, so merging rows pays; on a CPU the arithmetic
    dominates (docs/packing.md has the measurements)."""
    return 8192 if device.type == "cuda" else 64


def host_layout(attention_mask: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """What packing and length groups are planned from, on the host: int32 [N, 1 + L], each row's length
    followed by 1 where the row has a label. Read from the collator's CPU batch it costs nothing; read
    from device tensors it waits for all the work queued before it."""
    mask, labels = (t.numpy() if t.device.type == "cpu" else t.cpu().numpy() for t in (attention_mask, labels))
    out = np.empty((mask.shape[0], mask.shape[1] + 1), dtype=np.int32)
    out[:, 0] = mask.sum(axis=1)
    np.not_equal(labels, -100, out=out[:, 1:])
    return out


def to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without waiting for the device: a plain (blocking) copy to a GPU waits
    for every queued kernel, the previous step's included. Pinned, the copy is queued like a kernel."""
    t = torch.from_numpy(values)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def pack_rows(lengths: list[int], capacity: int) -> tuple[list[int], list[int], int]:
    """Best-fit-decreasing packing of spans into rows of `capacity` tokens: (row, offset) of every span
    and the number of rows. Deterministic in the lengths alone, so a gradient-cache replay packs alike."""
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a span of {max(lengths)} tokens does not fit a packed row of {capacity}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()  # longest first, ties in order
    free: list[list[int]] = [[] for _ in range(capacity + 1)]  # free[c]: rows with exactly c tokens free
    nonempty = 0  # bit c set <=> free[c] is not empty: the tightest fit is one bit scan away
    used: list[int] = []
    row_of, offset_of = [0] * len(lengths), [0] * len(lengths)
    for i in order:
        n = lengths[i]
        fits = nonempty >> n
        if fits:
            c = n + (fits & -fits).bit_length() - 1  # the fewest free tokens that still hold the span
            row = free[c].pop()
            if not free[c]:
                nonempty &= ~(1 << c)
        else:
            used.append(0)
            row = len(used) - 1
        row_of[i], offset_of[i] = row, used[row]
        used[row] += n
        c = capacity - used[row]
        free[c].append(row)
        nonempty |= 1 << c
    return row_of, offset_of, len(used)


@dataclass
class PartialLayer:
    """A layer computed only at some slots of the packed rows: `want` [M] the slots, in the order its
    output is returned; the layer's queries are laid out `per_row` to a row, `queries` [rows * per_row]
    naming the slot each query place reads and `take` [M] the place of each wanted slot."""

    want: Any
    queries: Any
    take: Any
    per_row: int


@dataclass
class PackPlan:
    """Where each span goes in packed rows of `capacity` tokens, planned on the host (numpy arrays;
    `to(device)` moves them all in ONE copy). Per real token: `dest` its slot in the flattened rows and
    `src` its place in the flattened [N, L] input. Per span: `starts` its first (CLS) slot. Per masked
    token, in (span, position) order: `slots` its slot and `masked` its place in the input. `last` and
    `head`: the partial last backbone and last head layers, when they run partially."""

    rows: int
    capacity: int
    dest: Any
    src: Any
    starts: Any
    slots: Any
    masked: Any
    last: Optional[PartialLayer] = None
    head: Optional[PartialLayer] = None

    def to(self, device: torch.device) -> "PackPlan":
        flat = [self.dest, self.src, self.starts, self.slots, self.masked]
        partial = [p for p in (self.last, self.head) if p is not None]
        for p in partial:
            flat += [p.want, p.queries, p.take]
        moved = iter(to_device(np.concatenate(flat), device).split([len(a) for a in flat]))
        dest, src, starts, slots, masked = (next(moved) for _ in range(5))
        on_device = [PartialLayer(next(moved), next(moved), next(moved), p.per_row) for p in partial]
        last = on_device.pop(0) if self.last is not None else None
        head = on_device.pop(0) if self.head is not None else None
        return PackPlan(self.rows, self.capacity, dest, src, starts, slots, masked, last, head)


def plan_packing(layout: np.ndarray, pack_length: int, last_at: Optional[str], head_at_masked: bool) -> PackPlan:
    """Pack the spans of `layout` (see `host_layout`) into rows of `pack_length` tokens (longer when a span
    is, rounded up to a multiple of 8). last_at: where the last backbone layer is read, "cls" or
    "cls+masked" (None: everywhere, it runs whole); head_at_masked: the last head layer runs at the
    masked slots."""
    n, width = layout.shape[0], layout.shape[1] - 1
    lens = layout[:, 0].astype(np.int64)
    capacity = -(-max(pack_length, int(lens.max())) // 8) * 8  # aligned rows suit the attention kernels
    row_of, offset_of, rows = pack_rows(lens.tolist(), capacity)
    span = np.repeat(np.arange(n), lens)  # per real token: its span
    within = np.arange(len(span)) - np.repeat(np.cumsum(lens) - lens, lens)  # its position in the span
    starts = np.asarray(row_of, dtype=np.int64) * capacity + np.asarray(offset_of, dtype=np.int64)
    span_m, pos_m = np.nonzero(layout[:, 1:].astype(bool) & (np.arange(width)[None, :] < lens[:, None]))
    slots = starts[span_m] + pos_m

    def partial(want: np.ndarray) -> PartialLayer:
        return PartialLayer(want, *query_layout(want, rows, capacity))

    last = None if last_at is None else partial(np.concatenate([starts, slots]) if last_at == "cls+masked" else starts)
    return PackPlan(rows, capacity, dest=np.repeat(starts, lens) + within, src=span * width + within, starts=starts,
                    slots=slots, masked=span_m * width + pos_m, last=last,
                    head=partial(slots) if head_at_masked else None)


def query_layout(want: np.ndarray, rows: int, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Slots of packed rows at which a layer's output is wanted, laid out as that layer's queries: each
    row gets Q query places (Q = the most wanted slots in one row, at least 1). Returns (queries
    [rows * Q]: the slot each place reads, free places reading their row's first slot; take [len(want)]:
    the place of each wanted slot, in `want` order; Q)."""
    row = want // capacity
    counts = np.bincount(row, minlength=rows)
    q = max(int(counts.max(initial=0)), 1)
    rank = np.empty(len(want), dtype=np.int64)  # each wanted slot's place within its row
    rank[np.argsort(row, kind="stable")] = np.arange(len(want)) - np.repeat(np.cumsum(counts) - counts, counts)
    take = row * q + rank
    queries = np.repeat(np.arange(rows, dtype=np.int64) * capacity, q)
    queries[take] = want
    return queries, take, q


def length_groups(lengths: list[int], width: int, max_width: int, call_cost: int) -> list[tuple[int, list[int]]]:
    """Rows grouped for encoding: [(padded width, row indices)], narrowest first.

    Lengths are rounded up to a multiple of `width` (capped at `max_width`); neighbouring widths are
    then merged where that is cheaper, counting each group as (rows x its widest width) + `call_cost`
    tokens. The grouping minimising that total is found exactly (a small dynamic programme over at
    most max_width / width distinct widths).
    """
    by_width: dict[int, list[int]] = {}
    for row, n in enumerate(lengths):
        by_width.setdefault(min(max_width, -(-n // width) * width), []).append(row)
    widths = sorted(by_width)
    counts = [len(by_width[w]) for w in widths]
    best = [0] + [None] * len(widths)  # best[j]: cheapest grouping of widths[:j]
    cut = [0] * (len(widths) + 1)
    for j in range(1, len(widths) + 1):
        rows = 0
        for i in range(j - 1, -1, -1):  # group = widths[i:j], padded to widths[j - 1]
            rows += counts[i]
            cost = best[i] + rows * widths[j - 1] + call_cost
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(widths)
    while j > 0:
        i = cut[j]
        groups.append((widths[j - 1], [r for w in widths[i:j] for r in by_width[w]]))
        j = i
    return groups[::-1]
