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
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info("Checkpoint written: %s", final)
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    state = json.loads((Path(path) / STATE_FILE).read_text())
    accelerator.load_state(str(path))
    return state
