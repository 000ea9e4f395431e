"""Entry point: `accelerate launch coco_accel/train.py [--config RECIPE.yaml] [--flags]` (also `python -m`)."""

from __future__ import annotations

import os
import runpy
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (accelerate launch coco_accel/train.py, the reference's way to launch), Python put this
    # folder first on the import path, where the package's own subpackages and commands (model, training,
    # evaluation, report, ...) would shadow installed packages of those names for every library in the
    # process. The package's parent folder takes its place, and the package's module runs as
    # `python -m coco_accel.train` would run it (in this process: same pid, arguments and interpreter flags).
    _here = os.path.dirname(os.path.realpath(__file__))
    if sys.path and os.path.realpath(sys.path[0] or ".") == _here:
        sys.path[0] = os.path.dirname(_here)
    runpy.run_module("coco_accel.train", run_name="__main__", alter_sys=True)  # ends the process

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from coco_accel.training.build import Run, build
from coco_accel.training.checkpoint import (PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, STOP_FILE, CheckpointError, StopRequest,
                                   save_checkpoint)
from coco_accel.training.config import ConfigError, TrainConfig, parse_config
from coco_accel.training.engine import finish

if TYPE_CHECKING:
    from coco_accel.training.tracking import TrainingLog

logger = logging.getLogger("coco_accel.train")


def train(cfg: TrainConfig) -> dict:
    """The whole run: build, loop, export. Returns the first and last logged records."""
    from coco_accel.training.batches import make_loader
    from coco_accel.training.tracking import TrainingLog

    run = build(cfg)
    cfg = run.cfg  # as the engine runs it (TrainConfig.for_engine)
    stop = _prepare_output(run)
    log = TrainingLog(run)
    evaluating = bool(run.heldout) or run.retrieval is not None
    evaluated_at = run.start_step if run.start_step else None  # a checkpoint's step was evaluated before it
    if evaluating and run.start_step == 0:
        evaluated_at = _evaluate(run, log, 0)  # the baseline every later value is compared with
    run.model.train()
    lr = None
    for batch in make_loader(run.batches, run.start_step, run.total_steps, cfg.data.dataloader_num_workers):
        step = batch.step + 1  # optimizer steps done once this one is
        outcome = run.train_step(batch, stop.requested)
        if outcome.applied:
            lr = outcome.lr
            log.meter.add(outcome.parts, outcome.grad_norm, overflow=outcome.overflow)
        run.docs_seen += batch.global_docs
        log.step_done(step, lr, run.train_step.skipped)
        if evaluating and cfg.evaluation.eval_steps and step % cfg.evaluation.eval_steps == 0:
            evaluated_at = _evaluate(run, log, step)
        if outcome.stop:
            return _preempted(run, log, stop, step)
        if cfg.checkpoints.save_steps and step % cfg.checkpoints.save_steps == 0 and step < run.total_steps:
            _checkpoint(run, step)
    if evaluating and evaluated_at != run.total_steps:
        _evaluate(run, log, run.total_steps)  # what the export scores
    log.close()
    _export(run)
    finish(run.accelerator)
    return {"first": log.first, "last": log.last, "steps": run.total_steps, "preempted": False}


def _evaluate(run: Run, log: "TrainingLog", step: int) -> int:
    """The held-out contrastive signal and retrieval on --eval_data at `step`, recorded as one evaluation."""
    from coco_accel.training.heldout import heldout_signal

    acc = run.accelerator
    record = {"step": step}
    if run.heldout:
        record.update(heldout_signal(run.model, run.heldout, acc.device, temperature=run.cfg.model.temperature,
                                     normalize=run.cfg.model.normalize))
    if run.retrieval is not None:
        backbone = acc.unwrap_model(run.model).mlm.base_model  # what AutoModel loads from the export
        record.update(run.retrieval(backbone, run.tokenizer, acc.process_index, acc.num_processes))
    log.evaluation(record)
    return step


def _prepare_output(run: Run) -> StopRequest:
    """The run folder (recipe, stale markers removed), trackers, and the stop request every process polls."""
    acc, cfg = run.accelerator, run.cfg
    out_dir = Path(cfg.io.output_dir)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(cfg.sections(), indent=2) + "\n")
        (out_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        (out_dir / STOP_FILE).unlink(missing_ok=True)
    acc.init_trackers("coco-accel", config={k: v for k, v in cfg.flags().items() if v is not None})
    acc.wait_for_everyone()  # nobody looks for a STOP file before the main process removed a stale one
    return StopRequest(out_dir / STOP_FILE if acc.is_main_process else None)


def _checkpoint(run: Run, step: int) -> None:
    state = {"step": step, "docs_seen": run.docs_seen, **run.provenance}
    save_checkpoint(run.accelerator, run.cfg.io.output_dir, step, state, total_limit=run.cfg.checkpoints.save_total_limit)


def _preempted(run: Run, log: TrainingLog, stop: StopRequest, step: int) -> dict:
    """A stop request (signal or STOP file) on any process: checkpoint, leave the marker, exit cleanly."""
    _checkpoint(run, step)
    if run.accelerator.is_main_process:
        (Path(run.cfg.io.output_dir) / PREEMPTED_MARKER).write_text(f"{stop.signal_name or 'signal'} at step {step}\n")
    logger.warning("Stopped by %s at step %d; checkpoint written. Resume with the same command.",
                   stop.signal_name or "a signal on another process", step)
    log.bar.close()
    finish(run.accelerator)
    return {"first": log.first, "last": log.last, "steps": step, "preempted": True}


def _export(run: Run) -> None:
    from coco_accel.model.export import save_export

    acc = run.accelerator
    acc.wait_for_everyone()
    state = acc.get_state_dict(run.model)  # gathers ZeRO-3 shards onto the main process
    if acc.is_main_process:
        save_export(acc.unwrap_model(run.model), run.tokenizer, run.cfg.io.output_dir, state)
    acc.wait_for_everyone()
    logger.info("Exported model: %s (AutoModel.from_pretrained loads it; Condenser head in condenser_head.safetensors)",
                os.path.abspath(run.cfg.io.output_dir))


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as err:
        return _refused(err)
    # torch comes with these: after the command line, so --help and a mistake in it answer at once
    from coco_accel.common.dist import PeerFailed
    from coco_accel.model.condenser import ModelError
    from coco_accel.training.batches import DataError

    try:
        result = train(cfg)
    except (ConfigError, DataError, ModelError, FloatingPointError, CheckpointError, PeerFailed) as err:
        return _refused(err)
    return PREEMPTED_EXIT_CODE if result["preempted"] else 0


def _refused(err: Exception) -> int:
    logging.basicConfig(level=logging.INFO)
    logger.error("%s", err)
    return 2


def _exit(code: int) -> None:
    """Leave the process. In a process group everything is written and every process has passed the
    final barrier by now, but C++ teardown (destroying the group, gloo and DeepSpeed threads at
    interpreter exit) aborted finished runs now and then (SIGABRT, 'terminate called without an active
    exception'); os._exit skips it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
