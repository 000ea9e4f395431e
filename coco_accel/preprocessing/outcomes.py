"""What became of each document of a corpus (kept, dropped, rejected, held out), counted on Arrow
columns so that memory stays bounded at MS MARCO scale; and the rejects file."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


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


def outcomes(built) -> Outcomes:
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


def empty_counts() -> dict:
    return {"read": 0, "kept": 0, "dropped": 0, "rejected": 0, "held_out": 0, "dropped_by_reason": {},
            "rejected_by_reason": {}}


def add_counts(total: dict, part: dict) -> None:
    for key in ("read", "kept", "dropped", "rejected", "held_out"):
        total[key] += part[key]
    for key in ("dropped_by_reason", "rejected_by_reason"):
        for reason, n in part[key].items():
            total[key][reason] = total[key].get(reason, 0) + n


def write_rejects(built, outcome: Outcomes, fh) -> None:
    idx = np.nonzero(outcome.rejected)[0]
    if len(idx) == 0:
        return
    rows = built.select(idx).select_columns(["corpus", "doc_id", "file", "line", "reject", "detail"])
    for i, row in zip(idx, rows):
        row["reason"] = row.pop("reject")
        if outcome.duplicate[i]:
            row["reason"], row["detail"] = "duplicate_id", "the same id appears earlier in this corpus"
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
