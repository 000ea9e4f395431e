"""A training run assembled from the recipe: every input checked and read on each process (before any
collective), then the engine, the model, the optimizer, the batches and the step function, resumed
from a checkpoint where there is one. `train.py` runs the loop over what `build` returns."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from coco_accel.common.files import output_folder_problem
from coco_accel.common.tokenizer_files import tokenizer_folder_problem, vocab_sha256
from coco_accel.evaluation.beir import EvalError
from coco_accel.training.checkpoint import (check_resume, checkpoint_to_resume, load_checkpoint, provenance, read_state,
                                   remove_partial, remove_stale_checkpoints)
from coco_accel.training.config import ConfigError, TrainConfig
from coco_accel.training.engine import build_accelerator, fill_deepspeed_config, growable_cuda_segments, setup_logging

if TYPE_CHECKING:  # the types only: the modules themselves load torch, imported where they are used
    import datasets
    import torch
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from coco_accel.evaluation.retrieval import TrainingEvaluation
    from coco_accel.training.batches import Batch, BatchPlan, SpanCollator, TrainBatches
    from coco_accel.training.step import TrainStep

logger = logging.getLogger("coco_accel.train")  # what it logs is the start of the training run


def _check_inputs(cfg: TrainConfig) -> None:
    """The folders a run needs, checked before anything loads: each problem named with its flag and fix."""
    model = Path(cfg.io.model_name_or_path)
    if not model.is_dir():
        raise ConfigError(f"--model_name_or_path {cfg.io.model_name_or_path}: "
                          f"{'a file' if model.exists() else 'no such folder'}"
                          "; give a folder holding a model (config.json and weights) and its tokenizer (runs are "
                          "offline: hub names are not fetched).")
    if not (model / "config.json").is_file():
        raise ConfigError(f"--model_name_or_path {cfg.io.model_name_or_path}: no config.json, so not a model folder "
                          "(an HF masked-LM folder, one of our exports, or a reference Condenser folder).")
    problem = tokenizer_folder_problem(cfg.io.model_name_or_path)
    if problem:
        raise ConfigError(f"--model_name_or_path {cfg.io.model_name_or_path}: {problem}; the trainer reads the "
                          "tokenizer from the model folder: save it there (tokenizer.save_pretrained).")
    problem = output_folder_problem("--output_dir", cfg.io.output_dir)
    if problem:
        raise ConfigError(problem)


def _check_data_tokenizer(cfg: TrainConfig, tokenizer) -> bool:
    """The training data must have been tokenized with the model's tokenizer: another vocabulary trains
    silently on wrong ids, or fails on the device hours in. Preprocessing records its tokenizer's hash;
    False when the data records none (the reference's format), to be checked token by token instead."""
    stats_file = Path(cfg.io.train_dir) / "stats.json"
    try:
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    except (OSError, ValueError):
        stats = {}
    recorded = stats.get("tokenizer_vocab_sha256")
    if recorded and recorded != vocab_sha256(tokenizer.get_vocab()):
        raise ConfigError(f"--train_dir {cfg.io.train_dir} was tokenized with {stats.get('tokenizer')} "
                          f"({stats.get('tokenizer_vocab_size')} tokens), whose vocabulary is not the one of "
                          f"--model_name_or_path {cfg.io.model_name_or_path} ({len(tokenizer)} tokens). Re-run "
                          f"`python -m coco_accel.preprocess --tokenizer {cfg.io.model_name_or_path} ...`.")
    return bool(recorded)


@dataclass(kw_only=True)
class Run:
    """Everything a training loop touches, built once."""

    cfg: TrainConfig  # as the engine runs it (TrainConfig.for_engine)
    accelerator: Accelerator
    model: torch.nn.Module  # the Condenser, wrapped by Accelerate (DDP or DeepSpeed's engine)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: PreTrainedTokenizerBase
    plan: BatchPlan
    batches: TrainBatches
    total_steps: int
    train_step: TrainStep  # a host batch in, the update applied
    heldout: dict[str, list[Batch]]  # per corpus: this process's held-out batches
    provenance: dict
    retrieval: Optional[TrainingEvaluation] = None
    start_step: int = 0
    docs_seen: int = 0


@dataclass(kw_only=True)
class _Inputs:
    """What a run reads before its first collective: every input loaded and checked."""

    resume: Optional[Path]
    reseed: bool  # resuming on another process count: per-process random streams restart
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module  # the Condenser
    dataset: datasets.Dataset
    plan: BatchPlan
    collator: SpanCollator
    heldout: dict[str, list[Batch]]
    retrieval: Optional[TrainingEvaluation]  # over --eval_data
    total_steps: int
    warmup: int
    provenance: dict


def _read_inputs(cfg: TrainConfig, accelerator) -> _Inputs:
    """Load and check every input on this process, running no collective (see dist.fail_together)."""
    from transformers import AutoTokenizer

    from coco_accel.model.warm_start import load_condenser
    from coco_accel.training.batches import BatchPlan, DataError, SpanCollator, check_token_range, load_train_data
    from coco_accel.training.heldout import heldout_batches
    from coco_accel.training.optim import warmup_steps_for

    resume = checkpoint_to_resume(cfg)
    _check_inputs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.io.model_name_or_path)
    shape, layout = cfg.model, cfg.layout
    model = load_condenser(cfg.io.model_name_or_path, n_head_layers=shape.n_head_layers, skip_from=shape.skip_from,
                           late_mlm=shape.late_mlm, strict_head=shape.strict_head, head_init=shape.head_init,
                           length_bucket_width=layout.length_bucket_width,
                           length_bucket_call_cost=layout.length_bucket_call_cost, pack_length=layout.pack_length,
                           pooling=shape.pooling)
    cfg.validate_against_model(model.config.num_hidden_layers, model.config.model_type, model.max_positions)
    dataset = load_train_data(cfg.io.train_dir)
    world = accelerator.num_processes
    per_device = cfg.per_device_docs(world)
    plan = BatchPlan(num_docs=len(dataset), global_docs=per_device * world, seed=cfg.job.seed,
                     drop_last=cfg.data.dataloader_drop_last, world_size=world, rank=accelerator.process_index)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"--model_name_or_path {cfg.io.model_name_or_path}: its tokenizer has {len(tokenizer)} tokens "
                          f"but the model's embeddings only {model.config.vocab_size} (config.json vocab_size): "
                          "resize the embeddings (model.resize_token_embeddings) and save the model again.")
    if not _check_data_tokenizer(cfg, tokenizer):
        check_token_range(dataset, len(tokenizer), cfg.io.train_dir)
    if plan.steps_per_epoch == 0:
        if len(dataset) < world:
            raise ConfigError(f"--train_dir {cfg.io.train_dir} holds {len(dataset)} documents, fewer than the {world} "
                              "processes: every process needs at least one per step. Add data or use fewer processes.")
        raise ConfigError(f"{len(dataset)} documents cannot fill one global batch of {plan.global_docs} with "
                          "--dataloader_drop_last: lower the batch size or add data.")
    total_steps = plan.total_steps(cfg.optim.num_train_epochs, cfg.optim.max_steps)
    if accelerator.state.deepspeed_plugin is not None:
        fill_deepspeed_config(accelerator, cfg, per_device, resume)
    collator = SpanCollator(tokenizer, cfg.data.max_seq_length, cfg.data.mlm_probability, cfg.job.seed,
                            whole_words=cfg.data.whole_word_mask)
    heldout = {}
    if cfg.evaluation.eval_steps:
        try:
            heldout_docs = load_train_data(cfg.io.train_dir, split="eval")
        except DataError as err:
            if not cfg.evaluation.eval_data:
                raise ConfigError(f"--eval_steps {cfg.evaluation.eval_steps} needs a held-out split (preprocess with "
                                  f"--eval_fraction > 0) or --eval_data ({err})") from None
            logger.info("No held-out split in --train_dir: --eval_steps measures retrieval on --eval_data only.")
        else:
            heldout = heldout_batches(heldout_docs, collator, plan, cfg.evaluation.eval_max_docs)
    made_from = provenance(cfg, accelerator, dataset, tokenizer, plan)
    reseed = resume is not None and check_resume(cfg, resume, read_state(resume), made_from)
    return _Inputs(resume=resume, reseed=reseed, tokenizer=tokenizer, model=model, dataset=dataset, plan=plan,
                   collator=collator, heldout=heldout, retrieval=_retrieval(cfg), total_steps=total_steps,
                   warmup=warmup_steps_for(total_steps, cfg.optim.warmup_steps, cfg.optim.warmup_ratio),
                   provenance=made_from)


def _retrieval(cfg: TrainConfig):
    """--eval_data read and checked (every folder before the first step), or None."""
    from coco_accel.evaluation.retrieval import TrainingEvaluation

    ev = cfg.evaluation
    if not ev.eval_data:
        return None
    try:
        return TrainingEvaluation(ev.eval_data, ev.eval_split, query_max_len=ev.eval_query_max_len,
                                  doc_max_len=ev.eval_doc_max_len, pooling=ev.eval_pooling or cfg.model.pooling,
                                  score=ev.eval_score,
                                  batch_size=ev.eval_batch_size)
    except EvalError as err:
        raise ConfigError(str(err)) from None


def build(cfg: TrainConfig) -> Run:
    from accelerate.utils import set_seed

    from coco_accel.common import dist
    from coco_accel.training.batches import TrainBatches
    from coco_accel.training.optim import build_optimizer, linear_schedule
    from coco_accel.training.step import TrainStep

    accelerator = build_accelerator(cfg)
    setup_logging(accelerator.is_main_process)
    plugin = accelerator.state.deepspeed_plugin
    cfg = cfg.for_engine(plugin.zero_stage if plugin is not None else None)
    if accelerator.is_main_process:
        remove_partial(cfg.io.output_dir)  # a run killed while writing one; the previous checkpoint is the latest
    accelerator.wait_for_everyone()
    set_seed(cfg.job.seed)
    with dist.fail_together():  # a bad input seen by one process (a folder missing on its node) stops them all
        inputs = _read_inputs(cfg, accelerator)
    if inputs.resume is None and accelerator.is_main_process:
        remove_stale_checkpoints(cfg.io.output_dir)
    model, plan, deepspeed = inputs.model, inputs.plan, accelerator.state.deepspeed_plugin is not None
    if cfg.model.reference_backbone_without_dropout:
        from coco_accel.model.condenser import disable_backbone_dropout

        logger.info("Backbone dropout off in %d modules (--reference_backbone_without_dropout).",
                    disable_backbone_dropout(model))
    if cfg.compute.torch_compile:
        model.compile_parts()
    growable_cuda_segments(accelerator.device)
    model.to(accelerator.device)  # first, so that the optimizer can be the fused CUDA one
    optimizer = build_optimizer(model, cfg.optim.learning_rate, cfg.optim.weight_decay, cfg.optim.optimizer)
    scheduler = linear_schedule(optimizer, inputs.warmup, inputs.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per optimizer step
    run = Run(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
              tokenizer=inputs.tokenizer, plan=plan, batches=TrainBatches(inputs.dataset, plan, inputs.collator),
              total_steps=inputs.total_steps, train_step=TrainStep(cfg, accelerator, model, optimizer, scheduler),
              heldout=inputs.heldout, provenance=inputs.provenance, retrieval=inputs.retrieval)
    if inputs.resume is not None:
        state = load_checkpoint(accelerator, inputs.resume)
        run.start_step, run.docs_seen = state["step"], state["docs_seen"]
        if inputs.reseed:  # another process count: per-process random streams cannot carry over one to one
            set_seed(cfg.job.seed + 1_000_003 * run.start_step + accelerator.process_index)
        logger.info("Resumed from %s at step %d.", inputs.resume, run.start_step)
    _log_run(cfg, accelerator, plan, documents=len(inputs.dataset), total_steps=inputs.total_steps,
             warmup=inputs.warmup, deepspeed=deepspeed)
    return run


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
                cfg.compute.cache_chunk_size if cfg.compute.cache_chunk_size > 0 else "off")
