"""The demo's corpus: the prose of the Python standard library's own docstrings, read from the source
files of the running interpreter with `ast` (nothing imported, nothing downloaded, nothing copied
into this project), as BEIR-style documents."""

from __future__ import annotations

import ast
import json
import re
import sysconfig
from pathlib import Path
from typing import Iterator

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


def _prose(doc: str) -> str:
    """Keep a docstring's prose paragraphs: no doctests, code blocks or tables."""
    keep = []
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if not lines or any(ln.lstrip().startswith((">>>", "...", "$ ", "|", "+-", "::")) for ln in lines):
            continue
        if lines[0].startswith((" ", "\t")):
            continue  # indented: a code block or a parameter table
        text = " ".join(ln.strip() for ln in lines)
        letters = sum(c.isalpha() or c.isspace() for c in text)
        if len(text) >= 40 and letters >= 0.85 * len(text):
            keep.append(text)
    return " ".join(keep)


def docstring_documents(min_chars: int = 300) -> Iterator[dict]:
    """BEIR-style documents (_id, title, text) from the standard library's docstrings, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            text = _prose(doc) if doc else ""
            if len(text) >= min_chars:
                name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                yield {"_id": f"{name}:{getattr(node, 'lineno', 0)}", "title": name, "text": text}


def write_corpus(folder: Path) -> int:
    """folder/corpus.jsonl of `docstring_documents()`; returns how many were written."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for doc in docstring_documents():
            fh.write(json.dumps(doc) + "\n")
            n += 1
    return n
