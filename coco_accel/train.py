"""Entry point: `accelerate launch coco_accel/train.py [--config RECIPE.yaml] [--flags]` (also `python -m`)."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script (accelerate launch coco_accel/train.py, the reference's way to launch), Python puts
    # this folder first on sys.path, where our beir.py, evaluate.py and config.py would shadow the PyPI
    # packages of those names for every library that imports them. `-m coco_accel.train` needs none of this.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from coco_accel.checkpoint import (PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, STOP_FILE, StopRequest, check_resume,
                                   provenance, resume_from)
from coco_accel.config import ConfigError, TrainConfig, parse_config, to_dict
from coco_accel.engine import build_accelerator, check_deepspeed, finish, growable_cuda_segments, setup_logging

if TYPE_CHECKING:
    from coco_accel.tracking import TrainingLog

logger = logging.getLogger("coco_accel.train")


def _check_inputs(cfg: TrainConfig) -> None:
    """The folders a run needs, checked before anything loads: each problem named with its flag and fix."""
    from coco_accel.files import output_folder_problem
    from coco_accel.wordpiece import tokenizer_folder_problem

    model = Path(cfg.model_name_or_path)
    if not model.is_dir():
        raise ConfigError(f"--model_name_or_path {cfg.model_name_or_path}: {'a file' if model.exists() else 'no such folder'}"
                          "; give a folder holding a model (config.json and weights) and its tokenizer (runs are "
                          "offline: hub names are not fetched).")
    if not (model / "config.json").is_file():
        raise ConfigError(f"--model_name_or_path {cfg.model_name_or_path}: no config.json, so not a model folder "
                          "(an HF masked-LM folder, one of our exports, or a reference Condenser folder).")
    problem = tokenizer_folder_problem(cfg.model_name_or_path)
    if problem:
        raise ConfigError(f"--model_name_or_path {cfg.model_name_or_path}: {problem}; the trainer reads the "
                          "tokenizer from the model folder: save it there (tokenizer.save_pretrained).")
    problem = output_folder_problem("--output_dir", cfg.output_dir)
    if problem:
        raise ConfigError(problem)


def _check_data_tokenizer(cfg: TrainConfig, tokenizer) -> bool:
    """The training data must have been tokenized with the model's tokenizer: another vocabulary trains
    silently on wrong ids, or fails on the device hours in. Preprocessing records its tokenizer's hash;
    False when the data records none (the reference's format), to be checked token by token instead."""
    from coco_accel.wordpiece import vocab_sha256

    stats_file = Path(cfg.train_dir) / "stats.json"
    try:
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    except (OSError, ValueError):
        stats = {}
    recorded = stats.get("tokenizer_vocab_sha256")
    if recorded and recorded != vocab_sha256(tokenizer.get_vocab()):
        raise ConfigError(f"--train_dir {cfg.train_dir} was tokenized with {stats.get('tokenizer')} "
                          f"({stats.get('tokenizer_vocab_size')} tokens), whose vocabulary is not the one of "
                          f"--model_name_or_path {cfg.model_name_or_path} ({len(tokenizer)} tokens). Re-run "
                          f"`python -m coco_accel.preprocess --tokenizer {cfg.model_name_or_path} ...`.")
    return bool(recorded)


@dataclass
class Run:
    """Everything a training loop touches, built once."""

    cfg: TrainConfig
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    plan: Any
    batches: Any
    total_steps: int
    step_fn: Callable
    heldout: dict
    provenance: dict
    deepspeed: bool = False
    retrieval: Any = None
    start_step: int = 0
    docs_seen: int = 0


@dataclass
class _Inputs:
    """What a run reads before its first collective: every input loaded and checked."""

    resume: Optional[Path]
    reseed: bool  # resuming on another process count: per-process random streams restart
    tokenizer: Any
    model: Any
    dataset: Any
    plan: Any
    collator: Any
    heldout: dict
    retrieval: Any  # evaluate.TrainingEvaluation over --eval_data, or None
    total_steps: int
    warmup: int
    provenance: dict


def _read_inputs(cfg: TrainConfig, accelerator) -> _Inputs:
    """Load and check every input on this process, running no collective (see dist.fail_together)."""
    from transformers import AutoTokenizer

    from coco_accel.checkpoint import read_state
    from coco_accel.data import BatchPlan, DataError, SpanCollator, check_token_range, load_train_data
    from coco_accel.heldout import heldout_batches
    from coco_accel.warm_start import load_condenser
    from coco_accel.optim import warmup_steps_for

    resume = resume_from(cfg, accelerator.is_main_process)
    _check_inputs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    model = load_condenser(cfg.model_name_or_path, n_head_layers=cfg.n_head_layers, skip_from=cfg.skip_from,
                           late_mlm=cfg.late_mlm, strict_head=cfg.strict_head, head_init=cfg.head_init,
                           length_bucket_width=cfg.length_bucket_width,
                           length_bucket_call_cost=cfg.length_bucket_call_cost, pack_length=cfg.pack_length)
    cfg.validate_against_model(model.config.num_hidden_layers, model.config.model_type, model.max_positions)
    dataset = load_train_data(cfg.train_dir)
    world = accelerator.num_processes
    per_device = cfg.per_device_docs(world)
    plan = BatchPlan(num_docs=len(dataset), global_docs=per_device * world, seed=cfg.seed,
                     drop_last=cfg.dataloader_drop_last, world_size=world, rank=accelerator.process_index)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"--model_name_or_path {cfg.model_name_or_path}: its tokenizer has {len(tokenizer)} tokens "
                          f"but the model's embeddings only {model.config.vocab_size} (config.json vocab_size): "
                          "resize the embeddings (model.resize_token_embeddings) and save the model again.")
    if not _check_data_tokenizer(cfg, tokenizer):
        check_token_range(dataset, len(tokenizer), cfg.train_dir)
    if plan.steps_per_epoch == 0:
        if len(dataset) < world:
            raise ConfigError(f"--train_dir {cfg.train_dir} holds {len(dataset)} documents, fewer than the {world} "
                              "processes: every process needs at least one per step. Add data or use fewer processes.")
        raise ConfigError(f"{len(dataset)} documents cannot fill one global batch of {plan.global_docs} with "
                          "--dataloader_drop_last: lower the batch size or add data.")
    total_steps = plan.total_steps(cfg.num_train_epochs, cfg.max_steps)
    if accelerator.state.deepspeed_plugin is not None:
        check_deepspeed(accelerator, cfg, per_device, model, resume)
    collator = SpanCollator(tokenizer, cfg.max_seq_length, cfg.mlm_probability, cfg.seed)
    heldout = {}
    if cfg.eval_steps:
        try:
            heldout_docs = load_train_data(cfg.train_dir, split="eval")
        except DataError as err:
            if not cfg.eval_data:
                raise ConfigError(f"--eval_steps {cfg.eval_steps} needs a held-out split (preprocess with "
                                  f"--eval_fraction > 0) or --eval_data ({err})") from None
            logger.info("No held-out split in --train_dir: --eval_steps measures retrieval on --eval_data only.")
        else:
            heldout = heldout_batches(heldout_docs, collator, plan, cfg.eval_max_docs)
    made_from = provenance(cfg, accelerator, dataset, tokenizer, plan)
    reseed = resume is not None and check_resume(cfg, resume, read_state(resume), made_from)
    return _Inputs(resume, reseed, tokenizer, model, dataset, plan, collator, heldout, _retrieval(cfg, accelerator),
                   total_steps, warmup_steps_for(total_steps, cfg.warmup_steps, cfg.warmup_ratio), made_from)


def _retrieval(cfg: TrainConfig, accelerator):
    """--eval_data read and checked (every folder before the first step), or None."""
    from coco_accel.beir import EvalError
    from coco_accel.evaluate import TrainingEvaluation

    if not cfg.eval_data:
        return None
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        raise ConfigError("--eval_data is not available under ZeRO-3: its parameters are gathered per module call, "
                          "and the processes encode different numbers of batches. Use ZeRO-1/2, or evaluate "
                          "the export with `python -m coco_accel.evaluate`.")
    try:
        return TrainingEvaluation(cfg.eval_data, cfg.eval_split, query_max_len=cfg.eval_query_max_len,
                                  doc_max_len=cfg.eval_doc_max_len, pooling=cfg.eval_pooling, score=cfg.eval_score,
                                  batch_size=cfg.eval_batch_size)
    except EvalError as err:
        raise ConfigError(str(err)) from None


def build(cfg: TrainConfig) -> Run:
    from accelerate.utils import set_seed

    from coco_accel import dist
    from coco_accel.checkpoint import load_checkpoint, remove_partial
    from coco_accel.data import TrainBatches
    from coco_accel.optim import build_optimizer, linear_schedule

    accelerator = build_accelerator(cfg)
    setup_logging(accelerator.is_main_process)
    if accelerator.is_main_process:
        remove_partial(cfg.output_dir)  # a run killed while writing one; the previous checkpoint is the latest
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    with dist.fail_together():  # a bad input seen by one process (a folder missing on its node) stops them all
        inputs = _read_inputs(cfg, accelerator)
    model, plan, deepspeed = inputs.model, inputs.plan, accelerator.state.deepspeed_plugin is not None
    if cfg.reference_backbone_without_dropout:
        from coco_accel.model import disable_backbone_dropout

        logger.info("Backbone dropout off in %d modules (--reference_backbone_without_dropout).",
                    disable_backbone_dropout(model))
    if cfg.torch_compile:
        model.compile_parts()
    growable_cuda_segments(accelerator.device)
    model.to(accelerator.device)  # first, so that the optimizer can be the fused CUDA one
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, cfg.optimizer)
    scheduler = linear_schedule(optimizer, inputs.warmup, inputs.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per optimizer step
    run = Run(cfg, accelerator, model, optimizer, scheduler, inputs.tokenizer, plan,
              TrainBatches(inputs.dataset, plan, inputs.collator), inputs.total_steps,
              _step_function(cfg, accelerator, model, deepspeed), inputs.heldout, inputs.provenance, deepspeed,
              inputs.retrieval)
    if inputs.resume is not None:
        state = load_checkpoint(accelerator, inputs.resume)
        run.start_step, run.docs_seen = state["step"], state["docs_seen"]
        if inputs.reseed:  # another process count: per-process random streams cannot carry over one to one
            set_seed(cfg.seed + 1_000_003 * run.start_step + accelerator.process_index)
        logger.info("Resumed from %s at step %d.", inputs.resume, run.start_step)
    _log_run(cfg, accelerator, plan, documents=len(inputs.dataset), total_steps=inputs.total_steps,
             warmup=inputs.warmup, deepspeed=deepspeed)
    return run


def _step_function(cfg: TrainConfig, accelerator, model, deepspeed: bool) -> Callable:
    """step(batch on the device, batch on the host, rows per process) -> loss parts, gradients accumulated."""
    from coco_accel.step import StepSettings, cached_step, plain_step

    def backward(loss, last: bool):
        if deepspeed:  # DeepSpeed owns the accumulation boundary and steps inside backward at the last one
            accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last)
        else:
            accelerator.backward(loss)

    settings = StepSettings(cfg.temperature, cfg.normalize)
    no_sync = (lambda: accelerator.no_sync(model)) if (accelerator.num_processes > 1 and not deepspeed) else None

    def step(batch, host, row_counts):
        if cfg.cache_chunk_size > 0:
            return cached_step(model, batch, backward, settings, chunk_size=cfg.cache_chunk_size, no_sync=no_sync,
                               host=host, compute=accelerator.autocast, row_counts=row_counts)
        return plain_step(model, batch, backward, settings, host=host, compute=accelerator.autocast,
                          row_counts=row_counts)

    return step


def _log_run(cfg: TrainConfig, accelerator, plan, *, documents: int, total_steps: int, warmup: int,
             deepspeed: bool) -> None:
    world = accelerator.num_processes
    nodes = world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    engine = (f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}" if deepspeed
              else "DDP" if world > 1 else "single process")
    logger.info("World size %d on %d node(s) | global batch %d documents (%d spans), %d per process | %d documents, "
                "%d steps per epoch | %d steps (%d warm-up) | precision %s | %s | gradient cache %s", world,
                nodes, plan.global_docs, 2 * plan.global_docs, plan.global_docs // world, documents,
                plan.steps_per_epoch, total_steps, warmup, accelerator.mixed_precision, engine,
                cfg.cache_chunk_size if cfg.cache_chunk_size > 0 else "off")


def train(cfg: TrainConfig) -> dict:
    """The whole run: build, loop, export. Returns the first and last logged records."""
    from coco_accel.data import make_loader
    from coco_accel.tracking import TrainingLog

    run = build(cfg)
    stop = _prepare_output(run)
    log = TrainingLog(run)
    if log.evaluating and run.start_step == 0:
        log.evaluate(0)  # the baseline every later value is compared with
    run.model.train()
    skipped, lr = 0, None
    for batch in make_loader(run.batches, run.start_step, run.total_steps, cfg.dataloader_num_workers):
        step = int(batch.pop("step")) + 1  # optimizer steps done once this one is
        global_docs = int(batch.pop("global_docs"))
        row_counts = [2 * n for n in batch.pop("rank_docs").tolist()]  # host tensors: no device sync
        parts = run.step_fn({k: v.to(run.accelerator.device, non_blocking=True) for k, v in batch.items()}, batch,
                            row_counts)
        stop_now, finite = _agree(run, stop, parts)
        if finite:
            lr = _update(run, parts, log.meter)
        else:
            skipped = _nonfinite(cfg, step, parts, skipped)
            run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        run.docs_seen += global_docs
        log.step_done(step, lr, skipped)
        if stop_now:
            return _preempted(run, log, stop, step)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < run.total_steps:
            _checkpoint(run, step)
    log.close()
    _export(run)
    finish(run.accelerator)
    return {"first": log.first, "last": log.last, "steps": run.total_steps, "preempted": False}


def _prepare_output(run: Run) -> StopRequest:
    """The run folder (recipe, stale markers removed), trackers, and the stop request every process polls."""
    acc, cfg = run.accelerator, run.cfg
    out_dir = Path(cfg.output_dir)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        (out_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        (out_dir / STOP_FILE).unlink(missing_ok=True)
    acc.init_trackers("coco-accel", config={k: v for k, v in to_dict(cfg).items() if v is not None})
    acc.wait_for_everyone()  # nobody looks for a STOP file before the main process removed a stale one
    return StopRequest(out_dir / STOP_FILE if acc.is_main_process else None)


def _agree(run: Run, stop: StopRequest, parts) -> tuple[bool, bool]:
    """(stop now, loss finite), the same on every process: one tiny all-reduce per step, the only host
    sync outside logging."""
    import torch

    from coco_accel import dist

    device = run.accelerator.device
    control = dist.all_reduce_sum(torch.stack([torch.tensor(float(stop.requested), device=device, dtype=torch.float64),
                                               parts.loss.double()])).tolist()
    return control[0] > 0, math.isfinite(control[1])


def _update(run: Run, parts, meter) -> float:
    """Clip, step the optimizer, count the step; returns the learning rate the step used."""
    acc, cfg = run.accelerator, run.cfg
    grad_norm = _clip(acc, run.model, cfg.max_grad_norm, deepspeed=run.deepspeed) if cfg.max_grad_norm > 0 else None
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    meter.add(parts, grad_norm, overflow=acc.scaler is not None and run.optimizer.step_was_skipped)
    return lr


def _checkpoint(run: Run, step: int) -> None:
    from coco_accel.checkpoint import save_checkpoint

    save_checkpoint(run.accelerator, run.cfg.output_dir, step, {"step": step, "docs_seen": run.docs_seen,
                                                                **run.provenance}, run.cfg.save_total_limit)


def _preempted(run: Run, log: TrainingLog, stop: StopRequest, step: int) -> dict:
    """A stop request (signal or STOP file) on any process: checkpoint, leave the marker, exit cleanly."""
    _checkpoint(run, step)
    if run.accelerator.is_main_process:
        (Path(run.cfg.output_dir) / PREEMPTED_MARKER).write_text(f"{stop.signal_name or 'signal'} at step {step}\n")
    logger.warning("Stopped by %s at step %d; checkpoint written. Resume with the same command.",
                   stop.signal_name or "a signal on another process", step)
    log.bar.close()
    finish(run.accelerator)
    return {"first": log.first, "last": log.last, "steps": step, "preempted": True}


def _clip(acc, model, max_norm: float, deepspeed: bool):
    """The norm before clipping. DeepSpeed clips inside its step and reports its own norm; otherwise the
    gradients are unscaled (fp16) and clipped by `optim.clip_grad_norm`."""
    from coco_accel.optim import clip_grad_norm

    if deepspeed:
        return acc.clip_grad_norm_(model.parameters(), max_norm)
    acc.unscale_gradients()
    return clip_grad_norm(model.parameters(), max_norm)


def _nonfinite(cfg: TrainConfig, step: int, parts, skipped: int) -> int:
    detail = (f"mlm_head={parts.mlm_head.item():.4g}, mlm_backbone={parts.mlm_backbone.item():.4g}, "
              f"contrastive={parts.contrastive.item():.4g} (this process's shares)")
    if skipped >= cfg.max_nonfinite_skips:
        raise FloatingPointError(
            f"non-finite loss at step {step}: {detail}. Lower --learning_rate, prefer bf16 to fp16, or allow "
            f"skipping with --max_nonfinite_skips (now {cfg.max_nonfinite_skips}).")
    logger.warning("Non-finite loss at step %d (%s): step skipped (%d of %d allowed).", step, detail, skipped + 1,
                   cfg.max_nonfinite_skips)
    return skipped + 1


def _export(run: Run) -> None:
    from coco_accel.export import save_export

    acc = run.accelerator
    acc.wait_for_everyone()
    state = acc.get_state_dict(run.model)  # gathers ZeRO-3 shards onto the main process
    if acc.is_main_process:
        save_export(acc.unwrap_model(run.model), run.tokenizer, run.cfg.output_dir, state)
    acc.wait_for_everyone()
    logger.info("Exported model: %s (AutoModel.from_pretrained loads it; Condenser head in condenser_head.safetensors)",
                os.path.abspath(run.cfg.output_dir))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from coco_accel.checkpoint import CheckpointError
    from coco_accel.data import DataError
    from coco_accel.dist import PeerFailed
    from coco_accel.model import ModelError

    try:
        cfg = parse_config(argv)
        result = train(cfg)
    except (ConfigError, DataError, ModelError, FloatingPointError, CheckpointError, PeerFailed) as err:
        logging.basicConfig(level=logging.INFO)
        logger.error("%s", err)
        return 2
    return PREEMPTED_EXIT_CODE if result["preempted"] else 0


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
