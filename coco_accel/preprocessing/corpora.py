"""Corpus readers: input paths -> a stream of documents, each bad line a counted reject, never a silent drop.

Formats: BEIR dataset folders (corpus.jsonl with _id, title, text), CQADupStack's nested sub-forum
folders, the MS MARCO collection (collection.tsv: id TAB text), JSON lines with text (+ title) or the
reference's {"spans": "<raw text>"}; any of these gzip-compressed (.gz).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """An input that cannot be read at all; the message names the path and what to do."""


@dataclass(frozen=True)
class Source:
    corpus: str  # the `corpus` column value
    path: str  # the file read
    kind: str  # "jsonl" or "tsv"
    id_prefix: str = ""  # keeps ids unique across CQADupStack's sub-forums


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _find_corpus_file(folder: Path) -> Path | None:
    for name in ("corpus.jsonl", "corpus.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror}). Fix its permissions or leave it out.") from None
    if not head:
        raise InputError(f"{path}: the file is empty. Re-create it (a broken download?) or leave it out.")
    if path.name.endswith(".gz") and head != b"\x1f\x8b":
        raise InputError(f"{path}: named .gz but not gzip-compressed (it does not start with gzip's signature). "
                         "If it is plain text, drop the .gz from its name; else re-create it.")


def discover(inputs: list[str]) -> list[Source]:
    """Resolve input paths into readable sources, or raise InputError naming the path."""
    sources: list[Source] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            corpus = path.name
            found = _find_corpus_file(path)
            if found is None:
                found = _find_corpus_file(path / "collection") if (path / "collection").is_dir() else None
            if found is not None:
                sources.append(Source(corpus, str(found), "jsonl"))
                continue
            tsv = [path / n for n in ("collection.tsv", "collection.tsv.gz") if (path / n).is_file()]
            if tsv:
                sources.append(Source(corpus, str(tsv[0]), "tsv"))
                continue
            nested = sorted(p for p in path.iterdir() if p.is_dir() and _find_corpus_file(p))
            if nested:  # CQADupStack: one corpus, one sub-folder per forum
                sources.extend(Source(corpus, str(_find_corpus_file(p)), "jsonl", f"{p.name}/") for p in nested)
                continue
            raise InputError(
                f"{path}: folder has no corpus.jsonl(.gz), no collection.tsv(.gz) and no sub-folders holding "
                "corpus.jsonl. Point at a BEIR dataset folder, the MS MARCO collection, or a JSON-lines file.")
        elif path.is_file():
            name = _strip_gz(path.name)
            stem = name.rsplit(".", 1)[0]
            kind = "tsv" if name.endswith(".tsv") else "jsonl"
            corpus = path.parent.name if stem in ("corpus", "collection") else stem
            sources.append(Source(corpus, str(path), kind))
        else:
            raise InputError(f"{path}: no such file or folder.")
    for src in sources:
        _check_readable(Path(src.path))
    return sources


def fingerprint(src: Source) -> tuple:
    """Changes whenever the file does: keys the raw-Arrow cache of a re-run."""
    st = os.stat(src.path)
    return (src.corpus, src.path, src.kind, src.id_prefix, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Shard:
    """A run of whole lines of one source: bytes [start, end) (end -1 = to the end), first line's number."""

    source: Source
    start: int
    end: int
    first_line: int
    fingerprint: tuple  # keys the raw-Arrow cache; changes with the file


def shards(sources: list[Source], n: int, min_bytes: int = 8 << 20) -> list[Shard]:
    """Cut each plain (not gzipped) file of at least `min_bytes` into up to `n` runs of whole lines, so
    that reading runs in `n` processes; line numbers stay those of the file, and shard after shard is
    the file from top to bottom."""
    out = []
    for src in sources:
        fp = fingerprint(src)
        size = os.path.getsize(src.path)
        if n <= 1 or src.path.endswith(".gz") or size < min_bytes:
            out.append(Shard(src, 0, -1, 1, fp))
            continue
        starts = [0]
        with open(src.path, "rb") as fh:
            for k in range(1, n):
                fh.seek(size * k // n - 1)
                fh.readline()  # to the end of the line holding the byte before the cut
                if starts[-1] < fh.tell() < size:
                    starts.append(fh.tell())
            first_lines, line, pos = [1], 1, 0
            fh.seek(0)
            for cut in starts[1:]:  # count line breaks before each cut
                while pos < cut:
                    chunk = fh.read(min(1 << 20, cut - pos))
                    line += chunk.count(b"\n")
                    pos += len(chunk)
                first_lines.append(line)
        ends = starts[1:] + [-1]
        out.extend(Shard(src, a, b, ln, fp + (a, b)) for a, b, ln in zip(starts, ends, first_lines))
    return out


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _row(src: Source, line: int, doc_id: str, *, title: str = "", text: str = "", reject: str = "",
         detail: str = "") -> dict:
    return {"corpus": src.corpus, "doc_id": doc_id, "title": title, "text": text,
            "file": src.path, "line": line, "reject": reject, "detail": detail}


def _parse_jsonl(src: Source, line_no: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return _row(src, line_no, "", reject="malformed_json", detail=str(err))
    if not isinstance(obj, dict):
        return _row(src, line_no, "", reject="not_an_object", detail=f"a JSON {type(obj).__name__}")
    raw_id = obj.get("_id", obj.get("id", obj.get("doc_id")))
    doc_id = src.id_prefix + (str(raw_id) if raw_id is not None else f"line{line_no}")
    if "text" in obj:
        text = obj["text"]
    elif isinstance(obj.get("spans"), str):  # the reference's raw-text input format
        text = obj["spans"]
    else:
        return _row(src, line_no, doc_id, reject="missing_text", detail="no 'text' field")
    if not isinstance(text, str):
        return _row(src, line_no, doc_id, reject="non_string_text", detail=f"'text' is a {type(text).__name__}")
    title = obj.get("title") or ""
    if not isinstance(title, str):
        return _row(src, line_no, doc_id, reject="non_string_title", detail=f"'title' is a {type(title).__name__}")
    return _row(src, line_no, doc_id, title=title, text=text)


def _parse_tsv(src: Source, line_no: int, line: str) -> dict:
    doc_id, sep, text = line.partition("\t")
    if not sep:
        return _row(src, line_no, "", reject="malformed_tsv", detail="no TAB between id and text")
    return _row(src, line_no, src.id_prefix + doc_id, text=text)


def read_rows(src: Source, start: int = 0, end: int = -1, first_line: int = 1) -> Iterator[dict]:
    """One row per non-blank line: a document, or a reject with its reason (never skipped silently).

    A file that cannot be read to its end (a gzip stream cut short or corrupt) or whose last line is a JSON
    record cut in the middle (an interrupted download or copy) raises InputError naming it: a damaged file
    is not a source of rejects."""
    try:
        yield from _rows(src, start, end, first_line)
    except (EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise InputError(f"{src.path}: cannot be read to its end ({type(err).__name__}: {err}). The file is "
                         "damaged (an interrupted download or copy?): re-create it or leave it out.") from None


def _rows(src: Source, start: int, end: int, first_line: int) -> Iterator[dict]:
    parse = _parse_tsv if src.kind == "tsv" else _parse_jsonl
    with _open(src.path) as fh:
        if start:
            fh.seek(start)
        pos = start
        for line_no, raw in enumerate(fh, start=first_line):
            if end >= 0 and pos >= end:
                break
            pos += len(raw)
            last_unterminated = not raw.endswith(b"\n")  # only the file's last line lacks its newline
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # byte-order mark
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue  # blank lines hold no document
            if b"\x00" in raw:
                yield _row(src, line_no, "", reject="nul_byte", detail="raw NUL byte in the line (corrupt file?)")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield _row(src, line_no, "", reject="invalid_utf8", detail=str(err))
                continue
            row = parse(src, line_no, line)
            if row["reject"] == "malformed_json" and last_unterminated:
                raise InputError(f"{src.path}, line {line_no}: the file ends inside a JSON record ({row['detail']}): "
                                 "it was cut short (an interrupted download or copy?). Re-create it, or remove "
                                 "the partial last line.")
            if not row["reject"]:
                row["text"] = row["text"].replace("\x00", " ")
                row["title"] = row["title"].replace("\x00", " ")
                if not (row["title"].strip() or row["text"].strip()):
                    row["reject"], row["detail"] = "empty_text", "title and text are empty"
            yield row


def resolve_recipe(recipe: str, root: str, skip_missing: bool) -> tuple[list[str], list[str]]:
    """A corpus-list YAML (`corpora: [names]`) under a root folder -> (input folders, missing names)."""
    import yaml

    path = Path(recipe)
    if not path.is_file():
        raise InputError(f"--corpora {recipe}: {'a folder' if path.exists() else 'no such file'}; give a "
                                 "corpus-list YAML such as configs/coco_corpora.yaml.")
    if not Path(root).is_dir():
        raise InputError(f"--corpus_root {root}: no such folder (it holds the corpora named in {recipe}).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(f"--corpora {recipe}: not valid YAML ({err}).") from None
    names = data.get("corpora") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{recipe}: expected a key 'corpora' holding a list of folder names.")
    found = [str(Path(root) / n) for n in names if (Path(root) / n).exists()]
    missing = [n for n in names if not (Path(root) / n).exists()]
    if missing and not skip_missing:
        raise InputError(
            f"{len(missing)} of {len(names)} corpora listed in {recipe} are not under {root}: {', '.join(missing)}. "
            "Download them (bioasq, signal1m, trec-news and robust04 need a licence), or pass --skip_missing.")
    if missing:
        logger.warning("Skipping %d missing corpora: %s", len(missing), ", ".join(missing))
    return found, missing
