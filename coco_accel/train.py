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
from pathlib import Path
from typing import Optional, Sequence

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


def build_accelerator(cfg: TrainConfig):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    kwargs = {}
    if launched_world > 1 and not torch.cuda.is_available():
        # CPU runs: NCCL needs a GPU. DeepSpeed needs gloo named explicitly (cpu=True would silently turn
        # it off); DDP needs cpu=True, or every process quietly trains alone as rank 0.
        if deepspeed:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            kwargs["cpu"] = True
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), **kwargs)
    if accelerator.num_processes != launched_world:
        raise ConfigError(f"the launcher started {launched_world} processes but they formed a group of "
                          f"{accelerator.num_processes}: check the accelerate config (on CPU use --multi_gpu "
                          "with ACCELERATE_USE_CPU=true, or torchrun).")
    return accelerator


def _fill_deepspeed_config(accelerator, cfg: TrainConfig) -> None:
    """Give DeepSpeed the recipe's numbers (the JSON says "auto"): we shard batches ourselves, so no
    dataloader goes through `prepare` for Accelerate to read them from."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, value in (("train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size),
                       ("gradient_accumulation_steps", 1),
                       ("train_batch_size", cfg.per_device_train_batch_size * accelerator.num_processes),
                       ("gradient_clipping", cfg.max_grad_norm)):
        if ds.get(key, "auto") != "auto" and ds[key] != value:
            raise ConfigError(f"the DeepSpeed config sets {key}={ds[key]} but the recipe implies {value}: "
                              f"set it to \"auto\" in the JSON so the recipe stays the single source.")
        ds[key] = value
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 3 and cfg.cache_chunk_size > 0:
        raise ConfigError("--cache_chunk_size with ZeRO-3 is not supported: stage 3 gathers parameters per "
                          "forward, and the cached re-encoding would gather them once per chunk. Use ZeRO-1/2.")


def _check_output_dir(cfg: TrainConfig) -> None:
    out = Path(cfg.output_dir)
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite_output_dir:
        raise ConfigError(f"--output_dir {cfg.output_dir} is not empty: pass --overwrite_output_dir to write "
                          "into it, or choose another folder.")


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if not is_main:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()


def train(cfg: TrainConfig) -> dict:
    """The whole run: build, loop, export. Returns the first and last logged records."""
    import torch
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from coco_accel.checkpoint import save_checkpoint
    from coco_accel.data import BatchPlan, SpanCollator, TrainBatches, load_train_data, make_loader
    from coco_accel.model import load_condenser, save_export
    from coco_accel.optim import build_optimizer, linear_schedule, warmup_steps_for
    from coco_accel.step import LossSettings, cached_step, plain_step
    from coco_accel.tracking import Meter, MetricsFile, is_finite

    accelerator = build_accelerator(cfg)
    _setup_logging(accelerator.is_main_process)
    _check_output_dir(cfg)
    set_seed(cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    model = load_condenser(cfg.model_name_or_path, cfg.n_head_layers, cfg.skip_from, cfg.late_mlm, cfg.strict_head)
    cfg.validate_against_model(model.config.num_hidden_layers, model.config.model_type)
    dataset = load_train_data(cfg.train_dir)

    world = accelerator.num_processes
    plan = BatchPlan(num_docs=len(dataset), global_docs=cfg.per_device_train_batch_size * world, seed=cfg.seed,
                     drop_last=cfg.dataloader_drop_last, world_size=world, rank=accelerator.process_index)
    if plan.steps_per_epoch == 0:
        raise ConfigError(f"{len(dataset)} documents cannot fill one global batch of {plan.global_docs} with "
                          "--dataloader_drop_last: lower --per_device_train_batch_size or add data.")
    total_steps = plan.total_steps(cfg.num_train_epochs, cfg.max_steps)
    warmup = warmup_steps_for(total_steps, cfg.warmup_steps, cfg.warmup_ratio)

    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    scheduler = linear_schedule(optimizer, warmup, total_steps)
    deepspeed = accelerator.state.deepspeed_plugin is not None
    if deepspeed:
        _fill_deepspeed_config(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per optimizer step

    collator = SpanCollator(tokenizer, cfg.max_seq_length, cfg.mlm_probability, cfg.seed)
    loader = make_loader(TrainBatches(dataset, plan, collator), 0, total_steps, cfg.dataloader_num_workers)
    settings = LossSettings(cfg.temperature, cfg.normalize)
    out_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    metrics = MetricsFile(out_dir / "metrics.jsonl", append=False) if accelerator.is_main_process else None

    logger.info("World size %d | global batch %d documents (%d spans) | %d documents, %d steps per epoch | "
                "%d steps (%d warm-up) | precision %s | gradient cache %s", world, plan.global_docs,
                2 * plan.global_docs, len(dataset), plan.steps_per_epoch, total_steps, warmup,
                accelerator.mixed_precision, cfg.cache_chunk_size if cfg.cache_chunk_size > 0 else "off")

    def backward(loss, last: bool):
        if deepspeed:  # DeepSpeed owns the accumulation boundary and steps inside backward at the last one
            accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last)
        else:
            accelerator.backward(loss)

    def run_step(batch):
        if cfg.cache_chunk_size > 0:
            no_sync = (lambda: accelerator.no_sync(model)) if (world > 1 and not deepspeed) else None
            return cached_step(model, batch, backward, settings, cfg.cache_chunk_size, no_sync)
        return plain_step(model, batch, backward, settings)

    model.train()
    meter = Meter(accelerator.device)
    first = last = None
    docs_seen = 0
    bar = tqdm(total=total_steps, desc="train", disable=not accelerator.is_main_process, dynamic_ncols=True)
    for batch in loader:
        step = int(batch.pop("step")) + 1  # 1-based count of optimizer steps done after this one
        global_docs = int(batch.pop("global_docs"))
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        parts = run_step(batch)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        docs_seen += global_docs
        meter.add(parts, grad_norm)
        bar.update(1)
        if step == 1 or step % cfg.logging_steps == 0 or step == total_steps:
            record = meter.flush(step, lr, docs_seen)
            if not is_finite(record):
                raise FloatingPointError(
                    f"non-finite loss at step {step}: mlm_head={record['mlm_head']}, mlm_backbone="
                    f"{record['mlm_backbone']}, contrastive={record['contrastive']}. Lower --learning_rate or use bf16.")
            first = first or record
            last = record
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['contrastive_acc']:.2f}")
            if metrics is not None:
                metrics.write(record)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
            save_checkpoint(accelerator, cfg.output_dir, step, {"step": step, "docs_seen": docs_seen})
    bar.close()

    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_export(accelerator.unwrap_model(model), tokenizer, cfg.output_dir, state)
    accelerator.wait_for_everyone()
    logger.info("Exported model: %s (AutoModel.from_pretrained loads it; Condenser head in condenser_head.safetensors)",
                os.path.abspath(cfg.output_dir))
    if first and last:
        logger.info("Loss: first %.4f (step %d) -> last %.4f (step %d); contrastive accuracy %.3f -> %.3f",
                    first["loss"], first["step"], last["loss"], last["step"], first["contrastive_acc"],
                    last["contrastive_acc"])
    accelerator.end_training()
    return {"first": first, "last": last, "steps": total_steps}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from coco_accel.data import DataError
    from coco_accel.model import ModelError

    try:
        cfg = parse_config(argv)
        train(cfg)
    except (ConfigError, DataError, ModelError) as err:
        logging.basicConfig(level=logging.INFO)
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
