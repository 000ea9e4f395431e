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


DEEPSPEED_TAG = "pytorch_model"  # the folder Accelerate's save_state gives DeepSpeed's engine in a checkpoint


def is_universal(path: Path) -> bool:
    """A DeepSpeed checkpoint converted to the universal format (loads on any process count)."""
    return (Path(path) / DEEPSPEED_TAG / "zero").is_dir()


def to_universal(path: Path) -> Path:
    """Convert a ZeRO checkpoint in place to DeepSpeed's universal format, which any process count loads.

    DeepSpeed's converter writes the universal copy beside the partitioned one; the partitioned one is kept
    as `pytorch_model_partitioned/`, the universal one takes its place. Our trainer state, the scheduler and
    the RNG files stay as they are.
    """
    from deepspeed.checkpoint import ds_to_universal

    path = Path(path)
    source, partitioned, converted = path / DEEPSPEED_TAG, path / f"{DEEPSPEED_TAG}_partitioned", \
        path / f"{DEEPSPEED_TAG}_universal"
    if is_universal(path):
        return path
    if not (path / STATE_FILE).is_file() or not source.is_dir():
        raise CheckpointError(f"{path}: not a DeepSpeed checkpoint of coco_accel (no {STATE_FILE} or {DEEPSPEED_TAG}/).")
    shutil.rmtree(converted, ignore_errors=True)
    import sys

    # DeepSpeed's converter reads its own command line; --inject_missing_state supplies the parameter-layout
    # record that only Megatron-style clients save.
    argv, sys.argv = sys.argv, ["ds_to_universal", "--input_folder", str(source), "--output_folder", str(converted),
                                "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    try:
        ds_to_universal.main(ds_to_universal.parse_arguments())
    finally:
        sys.argv = argv
    os.replace(source, partitioned)
    os.replace(converted, source)
    (path / "latest_universal").unlink(missing_ok=True)  # the trainer names the tag it loads
    return path


def main(argv=None) -> int:
    """`python -m coco_accel.checkpoint universal CHECKPOINT`: make a ZeRO checkpoint loadable on any process count."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m coco_accel.checkpoint", description=main.__doc__)
    p.add_argument("command", choices=["universal"])
    p.add_argument("checkpoint", help="a checkpoint-STEP folder written under DeepSpeed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        to_universal(Path(args.checkpoint))
    except CheckpointError as err:
        logger.error("%s", err)
        return 2
    logger.info("%s is now a universal checkpoint: resume it on any number of processes.", args.checkpoint)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
