"""Entry point: `accelerate launch coco_accel/train.py [--config RECIPE.yaml] [--flags]` (also `python -m`)."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script (accelerate launch coco_accel/train.py): keep this folder off sys.path so our
    # module names can never shadow installed packages.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from coco_accel.config import ConfigError, TrainConfig, parse_config, to_dict

logger = logging.getLogger("coco_accel.train")


def _mixed_precision(cfg: TrainConfig) -> Optional[str]:
    """--fp16/--bf16 (the reference's flags) must agree with the launch config, which owns precision."""
    wanted = "fp16" if cfg.fp16 else "bf16" if cfg.bf16 else None
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if wanted and launched and launched not in ("no", wanted):
        raise ConfigError(f"--{wanted} contradicts the accelerate config's mixed_precision: {launched}. "
                          "Drop the flag or change the config.")
    return wanted


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; requeue and resume
PREEMPTED_MARKER = "PREEMPTED"  # also left in --output_dir: launchers may not pass exit codes through
STOP_FILE = "STOP"  # created in --output_dir (by slurm/train.sbatch, or by hand): checkpoint and stop


def build_accelerator(cfg: TrainConfig):
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    kwargs = {}
    if launched_world > 1:
        # A collective that waits longer than this fails, so one dead rank ends the job instead of hanging it.
        group = {"timeout": timedelta(seconds=cfg.ddp_timeout)}
        if not torch.cuda.is_available():
            # CPU runs: NCCL needs a GPU. DeepSpeed needs gloo named explicitly (cpu=True would silently
            # turn it off); DDP needs cpu=True, or every process quietly trains alone as rank 0.
            if deepspeed:
                group["backend"] = "gloo"
            else:
                kwargs["cpu"] = True
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(**group)]
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), log_with=_trackers(cfg.report_to),
                              project_dir=cfg.output_dir, **kwargs)
    if accelerator.num_processes != launched_world:
        raise ConfigError(f"the launcher started {launched_world} processes but they formed a group of "
                          f"{accelerator.num_processes}: check the accelerate config (on CPU use --multi_gpu "
                          "with ACCELERATE_USE_CPU=true, or torchrun).")
    return accelerator


def _trackers(report_to: str) -> list[str]:
    """Accelerate trackers that are installed; a missing one is logged, never fatal."""
    import importlib.util

    wanted = {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [t.strip() for t in report_to.split(",")])
    modules = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb",)}
    found = []
    for name in wanted:
        if name not in modules:
            raise ConfigError(f"--report_to {report_to}: unknown tracker '{name}'; use tensorboard, wandb, all or none.")
        if any(importlib.util.find_spec(m) for m in modules[name]):
            found.append(name)
        elif report_to != "all":
            logger.warning("--report_to %s: the package is not installed; metrics go to metrics.jsonl only.", name)
    return found


def _fill_deepspeed_config(accelerator, cfg: TrainConfig, per_device: int) -> None:
    """Give DeepSpeed the recipe's numbers (the JSON says "auto"): we shard batches ourselves, so no
    dataloader goes through `prepare` for Accelerate to read them from."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, value in (("train_micro_batch_size_per_gpu", per_device),
                       ("gradient_accumulation_steps", 1),
                       ("train_batch_size", per_device * accelerator.num_processes),
                       ("gradient_clipping", cfg.max_grad_norm)):
        if ds.get(key, "auto") != "auto" and ds[key] != value:
            raise ConfigError(f"the DeepSpeed config sets {key}={ds[key]} but the recipe implies {value}: "
                              f"set it to \"auto\" in the JSON so the recipe stays the single source.")
        ds[key] = value
    if cfg.optimizer == "sgd":  # ZeRO partitions any torch optimizer; DeepSpeed asks to be told for untested ones
        ds["zero_allow_untested_optimizer"] = True
    if ds.get("zero_optimization", {}).get("stage", 0) == 3 and cfg.cache_chunk_size > 0:
        raise ConfigError("--cache_chunk_size with ZeRO-3 is not supported: stage 3 gathers parameters per "
                          "forward, and the cached re-encoding would gather them once per chunk. Use ZeRO-1/2.")


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if not is_main:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()


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


def _resume_from(cfg: TrainConfig, is_main: bool) -> Optional[Path]:
    """The checkpoint to continue from, and the output-directory rule (never overwrite by accident)."""
    from coco_accel.checkpoint import STATE_FILE, latest_checkpoint, list_checkpoints

    if cfg.resume not in ("auto", "none"):
        path = Path(cfg.resume)
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"--resume {cfg.resume}: not a complete checkpoint (no {STATE_FILE}).")
        return path
    found = latest_checkpoint(cfg.output_dir) if cfg.resume == "auto" else None
    if found is not None:
        return found
    out = Path(cfg.output_dir)
    if out.is_dir() and any(p.name not in (STOP_FILE, PREEMPTED_MARKER) for p in out.iterdir()):
        if not cfg.overwrite_output_dir:
            raise ConfigError(f"--output_dir {cfg.output_dir} is not empty and holds no checkpoint to resume: "
                              "pass --overwrite_output_dir to write into it, or choose another folder.")
        stale = list_checkpoints(cfg.output_dir)
        if stale and is_main:
            logger.info("Starting fresh (--resume none): removing %d old checkpoints from %s.", len(stale), out)
            import shutil

            for old in stale:
                shutil.rmtree(old, ignore_errors=True)
    return None


class _StopRequest:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption) only set a flag; the loop acts on it.

    A file named STOP in --output_dir does the same: launchers between SLURM and the training
    processes (torchrun's agent) do not forward SIGUSR1, a file reaches every node.
    """

    def __init__(self, stop_file: Optional[Path] = None):
        import signal

        self.signal_name: Optional[str] = None
        self.stop_file = stop_file
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        import signal

        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if self.signal_name is None and self.stop_file is not None and self.stop_file.exists():
            self.signal_name = f"{self.stop_file.name} file"
        return self.signal_name is not None


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
    from coco_accel.model import load_condenser
    from coco_accel.optim import warmup_steps_for

    resume = _resume_from(cfg, accelerator.is_main_process)
    _check_inputs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    model = load_condenser(cfg.model_name_or_path, n_head_layers=cfg.n_head_layers, skip_from=cfg.skip_from,
                           late_mlm=cfg.late_mlm, strict_head=cfg.strict_head,
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
        _check_deepspeed(accelerator, cfg, per_device, model, resume)
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
    provenance = _provenance(cfg, accelerator, dataset, tokenizer, plan)
    reseed = resume is not None and _check_resume(cfg, resume, read_state(resume), provenance)
    return _Inputs(resume, reseed, tokenizer, model, dataset, plan, collator, heldout, _retrieval(cfg, accelerator),
                   total_steps, warmup_steps_for(total_steps, cfg.warmup_steps, cfg.warmup_ratio), provenance)


def _retrieval(cfg: TrainConfig, accelerator):
    """--eval_data read and checked (every folder before the first step), or None."""
    from coco_accel.evaluate import EvalError, TrainingEvaluation

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


def _check_deepspeed(accelerator, cfg: TrainConfig, per_device: int, model, resume: Optional[Path]) -> None:
    """Fill the DeepSpeed config from the recipe and refuse what DeepSpeed cannot do."""
    from coco_accel.checkpoint import is_universal

    _fill_deepspeed_config(accelerator, cfg, per_device)
    if resume is not None and is_universal(resume):  # written by another process count, then converted
        accelerator.state.deepspeed_plugin.deepspeed_config["checkpoint"] = {"load_universal": True}
    if accelerator.state.deepspeed_plugin.zero_stage == 3 and model.length_bucket_width and not model.pack_length:
        # ZeRO-3 gathers each module's parameters collectively at every call, so every process must
        # call the encoder equally often; the number of length buckets differs between processes.
        logger.info("ZeRO-3: length buckets off (--length_bucket_width 0); rows pad to the batch's longest.")
        model.length_bucket_width = 0
    if cfg.max_nonfinite_skips:
        raise ConfigError("--max_nonfinite_skips is not available under DeepSpeed: it applies the update inside "
                          "backward, before the loss can be checked (its fp16 loss scaler skips overflow steps "
                          "itself). Drop the flag, or use DDP.")


def build(cfg: TrainConfig) -> Run:
    from accelerate.utils import set_seed

    from coco_accel import dist
    from coco_accel.checkpoint import load_checkpoint, remove_partial
    from coco_accel.data import TrainBatches
    from coco_accel.optim import build_optimizer, linear_schedule

    accelerator = build_accelerator(cfg)
    _setup_logging(accelerator.is_main_process)
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
    _growable_cuda_segments(accelerator.device)
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
    _log_run(cfg, accelerator, plan, len(inputs.dataset), inputs.total_steps, inputs.warmup, deepspeed)
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
            return cached_step(model, batch, backward, settings, cfg.cache_chunk_size, no_sync, host,
                               accelerator.autocast, row_counts)
        return plain_step(model, batch, backward, settings, host, accelerator.autocast, row_counts)

    return step


def _log_run(cfg: TrainConfig, accelerator, plan, documents: int, total_steps: int, warmup: int,
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


def _provenance(cfg: TrainConfig, accelerator, dataset, tokenizer, plan) -> dict:
    """What a checkpoint is made from, recorded in it and checked on resume."""
    from coco_accel.wordpiece import vocab_sha256

    plugin = accelerator.state.deepspeed_plugin
    return {"seed": cfg.seed, "global_docs": plan.global_docs, "world_size": accelerator.num_processes,
            "engine": f"deepspeed-zero{plugin.zero_stage}" if plugin is not None else "ddp",
            "data": {"train_dir": os.path.abspath(cfg.train_dir), "documents": len(dataset),
                     "fingerprint": getattr(dataset, "_fingerprint", None)},
            "tokenizer": {"name_or_path": cfg.model_name_or_path, "size": len(tokenizer),
                          "vocab_sha256": vocab_sha256(tokenizer.get_vocab())},
            "recipe": to_dict(cfg)}


def _check_resume(cfg: TrainConfig, path: Path, saved: dict, now: dict) -> bool:
    """Refuse a checkpoint this run cannot continue; True when the process count changed (DDP only).

    Checked before anything is loaded: a DeepSpeed checkpoint on another process count would end in a
    traceback from deep inside DeepSpeed. Checkpoints written before a field was recorded skip its check.
    """
    from coco_accel.checkpoint import is_universal

    if saved.get("global_docs") != now["global_docs"] or saved.get("seed") != now["seed"]:
        raise ConfigError(f"{path} was written with global batch {saved.get('global_docs')} documents and "
                          f"seed {saved.get('seed')}; this run has {now['global_docs']} and {now['seed']}. Resuming "
                          "would not continue the same run: match them, or pass --resume none.")
    override = " (or pass --resume_allow_changed_data if you mean to continue on it)"
    data, was = now["data"], saved.get("data")
    if was and (was["documents"], was["fingerprint"]) != (data["documents"], data["fingerprint"]):
        if not cfg.resume_allow_changed_data:
            raise ConfigError(f"{path} was made from --train_dir {was['train_dir']} ({was['documents']} documents, "
                              f"fingerprint {was['fingerprint']}); this run's {data['train_dir']} has "
                              f"{data['documents']} documents, fingerprint {data['fingerprint']}. Its position in the "
                              f"epoch means nothing on other data: point --train_dir at the original{override}.")
        logger.warning("Resuming %s on other data (--resume_allow_changed_data).", path)
    tok, was = now["tokenizer"], saved.get("tokenizer")
    if was and was["vocab_sha256"] != tok["vocab_sha256"]:
        if not cfg.resume_allow_changed_data:
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


def _growable_cuda_segments(device) -> None:
    """Spans pack into a different number of rows every step, so the caching allocator's fixed-size
    segments fragment until memory reserved but unusable makes a large batch run out of memory.
    Growable segments avoid that. An allocator setting of the user's wins."""
    import torch

    if device.type != "cuda" or "PYTORCH_ALLOC_CONF" in os.environ or "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter("expandable_segments:True")
    logger.info("CUDA allocator: expandable segments (set PYTORCH_ALLOC_CONF to choose otherwise).")


def train(cfg: TrainConfig) -> dict:
    """The whole run: build, loop, export. Returns the first and last logged records."""
    from coco_accel.data import make_loader

    run = build(cfg)
    stop = _prepare_output(run)
    log = _Log(run)
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
    _finish(run.accelerator)
    return {"first": log.first, "last": log.last, "steps": run.total_steps, "preempted": False}


def _prepare_output(run: Run) -> "_StopRequest":
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
    return _StopRequest(out_dir / STOP_FILE if acc.is_main_process else None)


def _agree(run: Run, stop: "_StopRequest", parts) -> tuple[bool, bool]:
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


def _preempted(run: Run, log: "_Log", stop: "_StopRequest", step: int) -> dict:
    """A stop request (signal or STOP file) on any process: checkpoint, leave the marker, exit cleanly."""
    _checkpoint(run, step)
    if run.accelerator.is_main_process:
        (Path(run.cfg.output_dir) / PREEMPTED_MARKER).write_text(f"{stop.signal_name or 'signal'} at step {step}\n")
    logger.warning("Stopped by %s at step %d; checkpoint written. Resume with the same command.",
                   stop.signal_name or "a signal on another process", step)
    log.bar.close()
    _finish(run.accelerator)
    return {"first": log.first, "last": log.last, "steps": step, "preempted": True}


class _Log:
    """What the loop reports: training records every --logging_steps, evaluations (held-out signal and
    --eval_data retrieval) at step 0, every --eval_steps and at the end, to metrics.jsonl (main process),
    the trackers and the progress bar."""

    def __init__(self, run: Run):
        from tqdm.auto import tqdm

        from coco_accel.tracking import MetricsFile

        self.run, acc = run, run.accelerator
        self.metrics = (MetricsFile(Path(run.cfg.output_dir) / "metrics.jsonl", keep_until=run.start_step)
                        if acc.is_main_process else None)
        self.meter = _meter(run.cfg, acc, acc.unwrap_model(run.model).config)
        self.bar = tqdm(total=run.total_steps, initial=run.start_step, desc="train", disable=not acc.is_main_process,
                        dynamic_ncols=True)
        self.evaluating = bool(run.heldout) or run.retrieval is not None
        self.evaluated_at = run.start_step if run.start_step else None
        self.first = self.last = None

    def write(self, record: dict) -> None:
        self.run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.metrics is not None:
            self.metrics.write(record)

    def evaluate(self, step: int) -> None:
        """The held-out contrastive signal and retrieval on --eval_data, logged as one record."""
        from coco_accel.heldout import heldout_signal

        run, acc = self.run, self.run.accelerator
        record = {"step": step}
        if run.heldout:
            record.update(heldout_signal(run.model, run.heldout, acc.device, run.cfg.temperature, run.cfg.normalize))
        if run.retrieval is not None:
            backbone = acc.unwrap_model(run.model).mlm.base_model  # what AutoModel loads from the export
            record.update(run.retrieval(backbone, run.tokenizer, acc.process_index, acc.num_processes))
            logger.info("Step %d: retrieval %s (%.1f s)", step, ", ".join(
                f"{k[len('eval/'):]} {v:.4f}" for k, v in record.items() if k.endswith("/ndcg@10")),
                record["eval/seconds"])
        self.write(record)
        self.evaluated_at = step

    def step_done(self, step: int, lr: Optional[float], skipped: int) -> None:
        cfg, acc = self.run.cfg, self.run.accelerator
        self.bar.update(1)
        if self.meter.steps and (step == 1 or step % cfg.logging_steps == 0 or step == self.run.total_steps):
            self.last = self.meter.flush(step, lr, self.run.docs_seen, skipped,
                                         loss_scale=acc.scaler.get_scale() if acc.scaler is not None else None)
            self.first = self.first or self.last
            self.bar.set_postfix(loss=f"{self.last['loss']:.3f}", acc=f"{self.last['contrastive_acc']:.2f}")
            self.write(self.last)
        if self.evaluating and cfg.eval_steps and step % cfg.eval_steps == 0:
            self.evaluate(step)

    def close(self) -> None:
        """The end of the run: a last evaluation (what the export scores) and the loss summary."""
        self.bar.close()
        if self.evaluating and self.evaluated_at != self.run.total_steps:
            self.evaluate(self.run.total_steps)
        if self.first and self.last:
            logger.info("Loss: first %.4f (step %d) -> last %.4f (step %d); contrastive accuracy %.3f -> %.3f",
                        self.first["loss"], self.first["step"], self.last["loss"], self.last["step"],
                        self.first["contrastive_acc"], self.last["contrastive_acc"])


def _clip(acc, model, max_norm: float, deepspeed: bool):
    """The norm before clipping. DeepSpeed clips inside its step and reports its own norm; otherwise the
    gradients are unscaled (fp16) and clipped by `optim.clip_grad_norm`."""
    from coco_accel.optim import clip_grad_norm

    if deepspeed:
        return acc.clip_grad_norm_(model.parameters(), max_norm)
    acc.unscale_gradients()
    return clip_grad_norm(model.parameters(), max_norm)


def _meter(cfg: TrainConfig, acc, model_config):
    """The metrics meter, with the model's FLOPs per token and, where known, the GPU's peak (MFU)."""
    from coco_accel.tracking import peak_tflops, useful_flops_per_token
    from coco_accel.tracking import Meter

    flops = lambda avg_len: useful_flops_per_token(model_config, cfg.n_head_layers, avg_len, cfg.mlm_probability,
                                                   cfg.late_mlm)
    sixteen_bit = acc.mixed_precision in ("bf16", "fp16")
    return Meter(acc.device, flops, cfg.peak_tflops or (peak_tflops(acc.device) if sixteen_bit else None))


def _finish(acc) -> None:
    """Close the trackers once every process is done. Single-process: Accelerate's end_training. In a
    process group, the group is left to `_exit`, which ends the process without C++ teardown."""
    acc.wait_for_everyone()
    if acc.num_processes > 1:
        for tracker in acc.trackers:
            tracker.finish()
    else:
        acc.end_training()


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
