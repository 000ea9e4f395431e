"""The engine a run trains with, built from the recipe: the Accelerate process group (DDP or DeepSpeed),
precision, trackers, DeepSpeed's numbers, the CUDA allocator and logging, and their orderly end."""

from __future__ import annotations

import importlib.util
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Optional

from coco_accel.training.checkpoint import is_universal
from coco_accel.training.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


def mixed_precision(cfg: TrainConfig) -> Optional[str]:
    """--fp16/--bf16 (the reference's flags) must agree with the launch config, which owns precision."""
    wanted = "fp16" if cfg.compute.fp16 else "bf16" if cfg.compute.bf16 else None
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
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("the accelerate config launches DeepSpeed (ZeRO), which is not installed: "
                          "pip install 'coco-accel[deepspeed]' (make install does), or launch with a DDP config "
                          "(accelerate_configs/ddp.yaml, cpu_ddp.yaml).")
    kwargs = {}
    if deepspeed and not torch.cuda.is_available():
        skip_shared_memory_allreduce_build()
    if launched_world > 1:
        # A collective that waits longer than this fails, so one dead rank ends the job instead of hanging it.
        group = {"timeout": timedelta(seconds=cfg.job.ddp_timeout)}
        if not torch.cuda.is_available():
            # CPU runs: NCCL needs a GPU. DeepSpeed needs gloo named explicitly (cpu=True would silently
            # turn it off); DDP needs cpu=True, or every process quietly trains alone as rank 0.
            if deepspeed:
                group["backend"] = "gloo"
            else:
                kwargs["cpu"] = True
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(**group)]
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg), log_with=trackers(cfg.job.report_to),
                              project_dir=cfg.io.output_dir, **kwargs)
    if accelerator.num_processes != launched_world:
        raise ConfigError(f"the launcher started {launched_world} processes but they formed a group of "
                          f"{accelerator.num_processes}: check the accelerate config (on CPU use --multi_gpu "
                          "with ACCELERATE_USE_CPU=true, or torchrun).")
    return accelerator


def skip_shared_memory_allreduce_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (about a minute of C++ on two cores)
    when its communication starts. Only its inference all-reduce uses it; training's collectives go
    through the gloo group, so the op is marked unbuildable for this process."""
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__  # the one dict DeepSpeed consults, probed on first access
    if "deepspeed_shm_comm" in compatible:
        compatible["deepspeed_shm_comm"] = False


def trackers(report_to: str) -> list[str]:
    """Accelerate trackers that are installed; a missing one is logged, never fatal."""
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


def fill_deepspeed_config(accelerator, cfg: TrainConfig, per_device: int, resume: Optional[Path]) -> None:
    """Give DeepSpeed the recipe's numbers (the JSON says "auto"): we shard batches ourselves, so no
    dataloader goes through `prepare` for Accelerate to read them from. A checkpoint converted to the
    universal format (written by another process count) is loaded as such."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, value in (("train_micro_batch_size_per_gpu", per_device),
                       ("gradient_accumulation_steps", 1),
                       ("train_batch_size", per_device * accelerator.num_processes),
                       ("gradient_clipping", cfg.optim.max_grad_norm)):
        if ds.get(key, "auto") != "auto" and ds[key] != value:
            raise ConfigError(f"the DeepSpeed config sets {key}={ds[key]} but the recipe implies {value}: "
                              f"set it to \"auto\" in the JSON so the recipe stays the single source.")
        ds[key] = value
    if cfg.optim.optimizer == "sgd":  # ZeRO partitions any torch optimizer; DeepSpeed asks to be told for untested ones
        ds["zero_allow_untested_optimizer"] = True
    if resume is not None and is_universal(resume):
        ds["checkpoint"] = {"load_universal": True}


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if not is_main:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()


def growable_cuda_segments(device) -> None:
    """Spans pack into a different number of rows every step, so the caching allocator's fixed-size
    segments fragment until memory reserved but unusable makes a large batch run out of memory.
    Growable segments avoid that. An allocator setting of the user's wins."""
    import torch

    if device.type != "cuda" or "PYTORCH_ALLOC_CONF" in os.environ or "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter("expandable_segments:True")
    logger.info("CUDA allocator: expandable segments (set PYTORCH_ALLOC_CONF to choose otherwise).")


def finish(acc) -> None:
    """Close the trackers once every process is done. Single-process: Accelerate's end_training. In a
    process group, the group is left to `_exit`, which ends the process without C++ teardown."""
    acc.wait_for_everyone()
    if acc.num_processes > 1:
        for tracker in acc.trackers:
            tracker.finish()
    else:
        acc.end_training()
