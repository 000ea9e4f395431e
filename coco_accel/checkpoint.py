"""Checkpoints: everything to continue a run, written atomically as output_dir/checkpoint-STEP/."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)


class CheckpointError(OSError):
    """A checkpoint could not be written; the previous one stays the latest."""


STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
_NAME = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL = re.compile(r"^\.checkpoint-(\d+)\.tmp$")


def remove_partial(output_dir: str) -> list[Path]:
    """Delete checkpoint folders a killed run left half-written (main process, before anything else)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    partial = sorted(p for p in root.iterdir() if _PARTIAL.match(p.name) and p.is_dir())
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
        logger.info("Removed a half-written checkpoint: %s", p)
    return partial


def prune(output_dir: str, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; returns what was deleted."""
    old = list_checkpoints(output_dir)[:-keep] if keep > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str) -> Optional[Path]:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, total_limit: Optional[int] = None) -> Path:
    """Model, optimizer, scheduler, scaler and RNG through `accelerator.save_state`, plus our counters.

    Written into a hidden temporary folder and renamed into place, so a crash mid-write never leaves
    a half checkpoint that looks complete.
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except OSError as err:
        previous = latest_checkpoint(output_dir)
        raise CheckpointError(f"writing checkpoint {final} failed ({err}). The latest complete checkpoint is still "
                              f"{previous or 'none'}; free disk space (or fix the folder) and run the same command "
                              "to resume.") from None
    if accelerator.is_main_process and total_limit:
        for old in prune(output_dir, total_limit):  # only once the new one is complete
            logger.info("Removed %s (--save_total_limit %d).", old, total_limit)
    accelerator.wait_for_everyone()
    logger.info("Checkpoint written: %s", final)
    return final


def read_state(path: Path) -> dict:
    """The counters and provenance a checkpoint was written with (read before loading anything heavy)."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def load_checkpoint(accelerator, path: Path) -> dict:
    state = read_state(path)
    accelerator.load_state(str(path))
    return state
