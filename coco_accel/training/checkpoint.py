"""Checkpoints and resuming: everything to continue a run, written atomically as output_dir/checkpoint-STEP/;
which checkpoint a run continues from and what it must match; stop requests (preemption)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Optional

from coco_accel.common.tokenizer_files import vocab_sha256
from coco_accel.training.config import ConfigError, TrainConfig

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


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, *,
                    total_limit: Optional[int] = None) -> Path:
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


# ---------------------------------------------------------------------------------------------------------
# resuming and stopping

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; requeue and resume
PREEMPTED_MARKER = "PREEMPTED"  # also left in --output_dir: launchers may not pass exit codes through
STOP_FILE = "STOP"  # created in --output_dir (by slurm/train.sbatch, or by hand): checkpoint and stop


def checkpoint_to_resume(cfg: TrainConfig) -> Optional[Path]:
    """The checkpoint a run continues from (--resume PATH, or under --resume auto the newest in --output_dir),
    or None for a fresh start. A fresh start into a folder holding other files is refused unless
    --overwrite_output_dir (never overwrite by accident)."""
    if cfg.checkpoints.resume not in ("auto", "none"):
        path = Path(cfg.checkpoints.resume)
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"--resume {cfg.checkpoints.resume}: not a complete checkpoint (no {STATE_FILE}).")
        return path
    found = latest_checkpoint(cfg.io.output_dir) if cfg.checkpoints.resume == "auto" else None
    if found is not None:
        return found
    out = Path(cfg.io.output_dir)
    if out.is_dir() and any(p.name not in (STOP_FILE, PREEMPTED_MARKER) for p in out.iterdir()):
        if not cfg.io.overwrite_output_dir:
            raise ConfigError(f"--output_dir {cfg.io.output_dir} is not empty and holds no checkpoint to resume: "
                              "pass --overwrite_output_dir to write into it, or choose another folder.")
    return None


def remove_stale_checkpoints(output_dir: str) -> list[Path]:
    """A fresh start into a folder with checkpoints (--resume none --overwrite_output_dir): they go, so that
    a later --resume auto cannot continue another run. Called once every input has been checked."""
    stale = list_checkpoints(output_dir)
    if stale:
        logger.info("Starting fresh: removing %d old checkpoints from %s.", len(stale), output_dir)
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)
    return stale


class StopRequest:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption) only set a flag; the loop acts on it.

    A file named STOP in --output_dir does the same: launchers between SLURM and the training
    processes (torchrun's agent) do not forward SIGUSR1, a file reaches every node.
    """

    def __init__(self, stop_file: Optional[Path] = None):
        self.signal_name: Optional[str] = None
        self.stop_file = stop_file
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if self.signal_name is None and self.stop_file is not None and self.stop_file.exists():
            self.signal_name = f"{self.stop_file.name} file"
        return self.signal_name is not None


def provenance(cfg: TrainConfig, accelerator, dataset, tokenizer, plan) -> dict:
    """What a checkpoint is made from, recorded in it and checked on resume."""
    plugin = accelerator.state.deepspeed_plugin
    return {"seed": cfg.job.seed, "global_docs": plan.global_docs, "world_size": accelerator.num_processes,
            "engine": f"deepspeed-zero{plugin.zero_stage}" if plugin is not None else "ddp",
            "data": {"train_dir": os.path.abspath(cfg.io.train_dir), "documents": len(dataset),
                     "fingerprint": getattr(dataset, "_fingerprint", None)},
            "tokenizer": {"name_or_path": cfg.io.model_name_or_path, "size": len(tokenizer),
                          "vocab_sha256": vocab_sha256(tokenizer.get_vocab())},
            "recipe": cfg.flags()}


def check_resume(cfg: TrainConfig, path: Path, saved: dict, now: dict) -> bool:
    """Refuse a checkpoint this run cannot continue; True when the process count changed (DDP only).

    Checked before anything is loaded: a DeepSpeed checkpoint on another process count would end in a
    traceback from deep inside DeepSpeed. Checkpoints written before a field was recorded skip its check.
    """
    if saved.get("global_docs") != now["global_docs"] or saved.get("seed") != now["seed"]:
        raise ConfigError(f"{path} was written with global batch {saved.get('global_docs')} documents and "
                          f"seed {saved.get('seed')}; this run has {now['global_docs']} and {now['seed']}. Resuming "
                          "would not continue the same run: match them, or pass --resume none.")
    override = " (or pass --resume_allow_changed_data if you mean to continue on it)"
    data, was = now["data"], saved.get("data")
    if was and (was["documents"], was["fingerprint"]) != (data["documents"], data["fingerprint"]):
        if not cfg.checkpoints.resume_allow_changed_data:
            raise ConfigError(f"{path} was made from --train_dir {was['train_dir']} ({was['documents']} documents, "
                              f"fingerprint {was['fingerprint']}); this run's {data['train_dir']} has "
                              f"{data['documents']} documents, fingerprint {data['fingerprint']}. Its position in the "
                              f"epoch means nothing on other data: point --train_dir at the original{override}.")
        logger.warning("Resuming %s on other data (--resume_allow_changed_data).", path)
    tok, was = now["tokenizer"], saved.get("tokenizer")
    if was and was["vocab_sha256"] != tok["vocab_sha256"]:
        if not cfg.checkpoints.resume_allow_changed_data:
            raise ConfigError(f"{path} was trained with the tokenizer of {was['name_or_path']} ({was['size']} tokens); "
                              f"this run's {tok['name_or_path']} has another vocabulary ({tok['size']} tokens): the "
                              f"embeddings would mean other tokens. Use the original --model_name_or_path{override}.")
        logger.warning("Resuming %s with another tokenizer (--resume_allow_changed_data).", path)
    engine, world = saved.get("engine"), saved.get("world_size")
    if engine and engine != now["engine"]:
        raise ConfigError(f"{path} was written under {engine}; this run uses {now['engine']}, which stores the model "
                          f"and optimizer in another layout. Resume with the launch config it was written with.")
    if world and world != now["world_size"]:
        if now["engine"].startswith("deepspeed") and not is_universal(path):
            raise ConfigError(f"{path} was written by {world} processes under {engine}, whose optimizer state is "
                              f"partitioned {world} ways; this run has {now['world_size']}. Resume with {world} "
                              "processes (the global batch, and so the run, stays the same), or convert it to "
                              f"DeepSpeed's universal format first: `python -m coco_accel.checkpoint universal {path}`.")
        logger.warning("Resuming %s, written by %d processes, on %d: the same global batches follow; dropout's "
                       "random streams restart per process (keyed by seed, step and rank).", path, world,
                       now["world_size"])
        return True
    return False
