"""A tokenizer folder's checks and identity, for every stage that reads one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def tokenizer_folder_problem(folder: str) -> Optional[str]:
    """What keeps `folder` from being a tokenizer folder (None when nothing does), for an error message."""
    path = Path(folder)
    if not path.exists():
        return "no such folder"
    if not path.is_dir():
        return "a file, not a folder"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return f"holds no tokenizer files (one of {', '.join(TOKENIZER_FILES)})"
    return None


def vocab_sha256(vocab: dict) -> str:
    """A tokenizer's identity for checks: the hash of its token -> id table, added tokens included."""
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
