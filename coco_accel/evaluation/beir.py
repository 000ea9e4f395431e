"""BEIR dataset folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv): checked and read, every unusable
line an error that names it."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterator

from coco_accel.common.files import json_lines

logger = logging.getLogger(__name__)


class EvalError(ValueError):
    """Evaluation input that cannot be used; the message names the file and the fix."""


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """(id, record) for each line of a BEIR corpus or queries file; a line that cannot be used (bad JSON, not
    an object, no `_id`) is an error naming it: skipping it would change the metrics silently."""
    for n, record, line in json_lines(path, EvalError):
        if not isinstance(record, dict) or record.get("_id") in (None, ""):
            raise EvalError(f"{path}:{n}: expected a JSON object with an \"_id\" (and \"text\"), as BEIR "
                            f"writes them; got {line.strip()[:80]!r}.")
        yield str(record["_id"]), record


def load_qrels(folder: Path, split: str) -> dict[str, dict[str, int]]:
    path = folder / "qrels" / f"{split}.tsv"
    if not path.is_file():
        have = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        raise EvalError(f"{folder}: no qrels/{split}.tsv (splits present: {have or 'none'}). Choose --split.")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as fh:
        for n, row in enumerate(csv.reader(fh, delimiter="\t"), start=1):
            if not row or (n == 1 and row[0] == "query-id"):
                continue
            if len(row) < 3:
                raise EvalError(f"{path}:{n}: expected query-id TAB corpus-id TAB score.")
            try:
                qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
            except ValueError:
                raise EvalError(f"{path}:{n}: score {row[2]!r} is not a number.") from None
    return qrels


def check_beir_folder(folder: str, split: str, flag: str = "--data") -> None:
    """The files a BEIR dataset folder must hold, checked before any model loads."""
    root = Path(folder)
    if not root.is_dir():
        raise EvalError(f"{flag} {folder}: {'a file' if root.exists() else 'no such folder'}; expected a BEIR dataset "
                        "folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).")
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (root / name).is_file():
            raise EvalError(f"{flag} {folder}: no {name}; expected a BEIR dataset folder (corpus.jsonl, "
                            "queries.jsonl, qrels/<split>.tsv).")
    if not (root / "qrels" / f"{split}.tsv").is_file():
        have = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        raise EvalError(f"{flag} {folder}: no qrels/{split}.tsv (splits present: {have or 'none'}). Choose --split.")


def load_beir(folder: str, split: str) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]], dict]:
    """(queries with judgements, corpus texts, qrels, counts of what was left out: queries without
    judgements, repeated ids, judged documents absent from the corpus)."""
    root = Path(folder)
    check_beir_folder(folder, split)
    qrels = load_qrels(root, split)
    all_queries = {qid: q.get("text") or "" for qid, q in _read_jsonl(root / "queries.jsonl")}
    missing = sorted(set(qrels) - set(all_queries))
    if missing:
        raise EvalError(f"{folder}: qrels/{split}.tsv judges {len(missing)} queries absent from queries.jsonl "
                        f"(e.g. {missing[:3]}).")
    queries = {q: all_queries[q] for q in qrels}
    corpus, repeated = {}, 0
    for doc_id, doc in _read_jsonl(root / "corpus.jsonl"):
        title, text = str(doc.get("title") or "").strip(), str(doc.get("text") or "").strip()
        repeated += doc_id in corpus
        corpus[doc_id] = f"{title} {text}".strip()
    absent = sum(d not in corpus for judged in qrels.values() for d in judged)
    left_out = {"queries_without_judgements": len(all_queries) - len(queries), "repeated_document_ids": repeated,
                "judged_documents_not_in_corpus": absent}
    if repeated:
        logger.warning("%s: %d documents repeat an earlier _id; the last one of each id is kept.", folder, repeated)
    if absent:
        logger.warning("%s: qrels/%s.tsv judges %d documents absent from corpus.jsonl; they count as not "
                       "retrieved.", folder, split, absent)
    return queries, corpus, qrels, left_out
