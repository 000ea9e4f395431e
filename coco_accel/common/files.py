"""The files the commands read and write: JSON-lines reading that names the line it cannot use, and
checks of the paths a command will write, made before any work starts (each returns what is wrong,
naming the flag and the path, or None)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional


def json_lines(path: Path, error: type[Exception]) -> Iterator[tuple[int, Any, str]]:
    """(line number, parsed value, line) for each non-blank line of a JSON-lines file. A line that is
    not UTF-8 or not JSON raises `error` naming the file and line: skipping it would change what the
    caller computes without a word. A byte-order mark on the first line is allowed."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise error(f"{path}:{n}: not UTF-8 ({err.reason} at byte {err.start}); re-encode the file.") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{n}: malformed JSON ({err}); the file holds one JSON value a line.") from None
            yield n, value, line


def output_folder_problem(flag: str, path: str) -> Optional[str]:
    """A folder the command creates (or reuses) and writes into."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        return f"{flag} {path} is a file: choose a folder (it is created if missing)."
    return _creatable(flag, path, out)


def output_file_problem(flag: str, path: str) -> Optional[str]:
    """A file the command writes (its folder is created if missing)."""
    out = Path(path)
    if out.is_dir():
        return f"{flag} {path} is a folder: give a file name (results.json)."
    return _creatable(flag, path, out.parent)


def _creatable(flag: str, path: str, folder: Path) -> Optional[str]:
    """`folder` exists as a writable folder, or its nearest existing parent is one (so it can be made)."""
    existing = next(p for p in [folder, *folder.absolute().parents] if p.exists())
    if not existing.is_dir():
        return f"{flag} {path}: {existing} is a file; choose another path."
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {path}: {existing} is not writable by this user; choose another path or fix its permissions."
    return None
