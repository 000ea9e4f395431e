"""A second test collection, in another domain, built from the manual pages installed on this machine.

CISI is the only shared collection, and the recipe in configs/coco_small.yaml was chosen on part of its
queries. This builds a known-item collection in BEIR layout from the system's man pages (sections 1, 5,
7 and 8), to see whether the recipe's effect carries to a collection it was not chosen on:

- a document is a page's DESCRIPTION section (its first `--doc_words` words), titled with the page name;
- a query is the page's one-line summary from its NAME section ("ls - list directory contents" gives
  "list directory contents"), judged relevant to that page only.

Pages whose summary is shared by another page are skipped, as are pre-release copies of another page's
command (a description opening "(ALPHA)", "(BETA)" or "(DEPRECATED)": a second right answer the
judgements would not know of) and pages with a summary of under three words or a description of under
twenty. Pages are sampled with a
keyed hash of their name, so the same installed pages give the same collection.

    python benchmarks/manpage_collection.py --output runs/manpages --docs 3000 --queries 400

The collection depends on what is installed; `collection.json` beside it records the counts and sources.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

SECTIONS = ("man1", "man5", "man7", "man8")
PRE_RELEASE = ("(ALPHA)", "(BETA)", "(DEPRECATED)")  # copies of another page's command, a second right answer
_HEADING = re.compile(r"^[A-Z][A-Z0-9 ,/&-]+$")


def _key(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "big")


def _render(page: Path) -> str:
    raw = gzip.decompress(page.read_bytes()) if page.suffix == ".gz" else page.read_bytes()
    run = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou"], input=raw, capture_output=True, timeout=60)
    return run.stdout.decode("utf-8", errors="replace")


def _sections(text: str) -> dict[str, str]:
    """The rendered page cut at its unindented headings (NAME, SYNOPSIS, DESCRIPTION, ...)."""
    found: dict[str, list[str]] = {}
    current = None
    lines = text.rstrip().splitlines()
    for line in lines[:-1]:  # the last line is the page's footer ("GNU coreutils 9.1  2022  LS(1)")
        if line and not line[0].isspace() and _HEADING.match(line.strip()):
            current = line.strip()
            found.setdefault(current, [])
        elif current is not None:
            found[current].append(line.strip())
    # groff hyphenates at line ends with U+2010 followed by the break; join those, then plain hyphens
    return {name: " ".join(" ".join(lines).replace("\u2010 ", "").replace("\u2010", "-").split())
            for name, lines in found.items()}


def parse_page(text: str, doc_words: int) -> tuple[str, str] | None:
    """(summary, description) of a rendered page, or None when either is missing or too short."""
    parts = _sections(text)
    name, description = parts.get("NAME", ""), parts.get("DESCRIPTION", "")
    if " - " not in name and " — " not in name:
        return None
    summary = re.split(r" [-—] ", name, maxsplit=1)[1].strip()
    words = description.split()
    if len(summary.split()) < 3 or len(words) < 20 or description.startswith(PRE_RELEASE):
        return None
    return summary, " ".join(words[:doc_words])


def _system_man_root() -> Path:
    found = subprocess.run(["manpath"], capture_output=True, text=True).stdout.strip().split(":")
    counts = {Path(f): sum(1 for s in SECTIONS if (Path(f) / s).is_dir() for _ in (Path(f) / s).iterdir())
              for f in found if f}
    if not counts or max(counts.values()) == 0:
        raise SystemExit("no manual pages found on `manpath`: pass --man_root")
    return max(counts, key=counts.get)


def build(*, man_root: Path, output: Path, docs: int, queries: int, doc_words: int, seed: int) -> dict:
    pages = sorted(p for section in SECTIONS for p in (man_root / section).glob("*") if p.is_file())
    if not pages:
        raise SystemExit(f"no manual pages under {man_root}/{{{','.join(SECTIONS)}}}: pass --man_root")
    pages.sort(key=lambda p: _key(p.name, seed))
    parsed: dict[str, tuple[str, str]] = {}
    for page in pages[: docs * 3]:  # some pages are skipped; three times the need is ample
        entry = parse_page(_render(page), doc_words)
        if entry is not None:
            parsed[page.name.split(".")[0] + "." + page.parent.name[3:]] = entry
    shared = {s for s, n in Counter(s.lower() for s, _ in parsed.values()).items() if n > 1}
    kept = [(name, s, d) for name, (s, d) in parsed.items() if s.lower() not in shared][:docs]
    if len(kept) < docs:
        print(f"only {len(kept)} usable pages of the {docs} asked for", file=sys.stderr)
    (output / "qrels").mkdir(parents=True, exist_ok=True)
    with open(output / "corpus.jsonl", "w", encoding="utf-8") as corpus:
        for name, _, description in kept:
            corpus.write(json.dumps({"_id": name, "title": name.rsplit(".", 1)[0], "text": description}) + "\n")
    asked = sorted(kept, key=lambda row: _key("query:" + row[0], seed))[:queries]
    with open(output / "queries.jsonl", "w", encoding="utf-8") as out, \
            open(output / "qrels" / "test.tsv", "w", encoding="utf-8") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for i, (name, summary, _) in enumerate(asked):
            out.write(json.dumps({"_id": f"q{i}", "text": summary}) + "\n")
            qrels.write(f"q{i}\t{name}\t1\n")
    record = {"documents": len(kept), "queries": len(asked), "doc_words": doc_words, "seed": seed,
              "pages_read": min(len(pages), docs * 3), "pages_installed": len(pages),
              "summaries_shared_and_skipped": len(shared),
              "by_prefix": dict(Counter(name.split("_")[0].split("-")[0] for name, _, _ in kept).most_common(8))}
    (output / "collection.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="the BEIR folder to write")
    parser.add_argument("--man_root", type=Path, default=None,
                        help="a folder holding man1/ man5/ ... (default: the folder on `manpath` with the most pages)")
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--doc_words", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.man_root is None:
        args.man_root = _system_man_root()
    print(json.dumps(build(man_root=args.man_root, output=args.output, docs=args.docs, queries=args.queries,
                           doc_words=args.doc_words, seed=args.seed)))


if __name__ == "__main__":
    main()
