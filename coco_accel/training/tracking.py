"""Training metrics: accumulated on device between log steps, reduced across processes, written to metrics.jsonl."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from coco_accel.common import dist
from coco_accel.training.step import StepParts

if TYPE_CHECKING:
    from coco_accel.training.config import TrainConfig

logger = logging.getLogger(__name__)

_PARTS = ("mlm_head", "mlm_backbone", "contrastive")


class Meter:
    """Sums of each step's parts since the last log: the losses on the device, the counts on the host, so
    that logging is the only host sync (a host number copied to a GPU each step would wait for it)."""

    def __init__(self, device: torch.device, flops_per_token: Optional[Callable[[float], float]] = None,
                 peak_tflops: Optional[float] = None):
        """flops_per_token(mean span length): model FLOPs per real token (`useful_flops_per_token` below), for
        the logged TFLOP/s; peak_tflops: one device's peak, for the logged MFU."""
        self.device = device
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # [*_PARTS, correct]
        self.counts = [0, 0, 0]  # spans, real tokens, computed tokens
        self.grad_norm_sum = 0.0
        self.grad_norms = 0
        self.steps = 0
        self.overflows = 0
        self.started = time.perf_counter()

    def add(self, parts: StepParts, grad_norm: Optional[torch.Tensor],
            overflow: Optional[torch.Tensor] = None) -> None:
        """overflow: 1 when the fp16 loss scaler skipped this step (a device tensor, read at the next flush)."""
        self.sums += torch.stack([parts.mlm_head.double(), parts.mlm_backbone.double(), parts.contrastive.double(),
                                  parts.correct.double()])
        for i, n in enumerate((parts.spans, parts.real_tokens, parts.computed_tokens)):
            self.counts[i] += n
        if grad_norm is not None:
            self.grad_norm_sum = self.grad_norm_sum + torch.as_tensor(grad_norm).detach().double()  # DeepSpeed: a float
            self.grad_norms += 1
        self.steps += 1
        if overflow is not None:
            self.overflows = self.overflows + overflow

    def flush(self, step: int, *, lr: float, docs_seen: int, skipped_steps: int = 0,
              loss_scale: Optional[float] = None) -> dict:
        """Global means over the steps since the last flush (all processes must call it together)."""
        counts = torch.tensor(self.counts, dtype=torch.float64).to(self.device)
        total = dist.all_reduce_sum(torch.cat([self.sums, counts])).tolist()  # host sync, once per logging interval
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        n = max(self.steps, 1)
        record = {"step": step}
        for i, name in enumerate(_PARTS):  # each process holds its share; their mean is the global mean
            record[name] = total[i] / (n * dist.world_size())
        record["loss"] = sum(record[p] for p in _PARTS)
        record["contrastive_acc"] = total[3] / max(total[4], 1)
        record["lr"] = lr
        if self.grad_norms:
            record["grad_norm"] = float(self.grad_norm_sum) / self.grad_norms
        record["real_tokens_per_s"] = total[5] / elapsed
        if self.flops_per_token is not None and total[4] > 0:  # whole job: every process's tokens
            record["model_tflops_per_s"] = self.flops_per_token(total[5] / total[4]) * total[5] / elapsed / 1e12
            if self.peak_tflops:
                record["mfu"] = record["model_tflops_per_s"] / (self.peak_tflops * dist.world_size())
        record["padding_fraction"] = 1.0 - total[5] / max(total[6], 1)
        record["docs_seen"] = docs_seen
        record["skipped_steps"] = skipped_steps
        if loss_scale is not None:  # fp16: dynamic loss scaling, and steps it skipped on overflow
            record["loss_scale"] = loss_scale
            record["overflow_steps"] = int(self.overflows)
        record["seconds_per_step"] = elapsed / n
        if self.device.type == "cuda":  # this process's peak since the last flush
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        self._reset()
        return record


class MetricsFile:
    """metrics.jsonl: one JSON object per logging step (main process only).

    A resumed run keeps the lines up to its checkpoint's step and drops later ones, which the
    interrupted run logged but will now be logged again.
    """

    def __init__(self, path: Path, keep_until: int = 0):
        self.path = path
        kept = []
        if keep_until and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip()
                    and json.loads(line)["step"] <= keep_until]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


# FLOP accounting: the model TFLOP/s and MFU logged per step


def useful_flops_per_token(config, *, n_head_layers: int, avg_len: float, mlm_fraction: float, late_mlm: bool) -> float:
    """Forward + backward FLOPs per real token of the Condenser's computation as defined, padding and
    shortcuts aside: 6 x (the layers' matmul weights, attention (QK^T and AV) over spans of `avg_len`
    tokens, and the MLM transform and vocabulary projection at the masked fraction, head and backbone).
    The numerator of MFU."""
    h = config.hidden_size
    layers = config.num_hidden_layers + n_head_layers
    mlp = (3 if config.model_type == "modernbert" else 2) * h * config.intermediate_size  # a GLU's input is doubled
    dense = layers * (4 * h * h + mlp)
    attention = layers * 2 * h * avg_len
    mlm = (1 + int(late_mlm)) * mlm_fraction * (h * h + h * config.vocab_size)
    return 6 * (dense + attention + mlm)


def peak_tflops(device: torch.device) -> Optional[float]:
    """Dense 16-bit tensor-core peak of the GPUs whose figure is known (NVIDIA's data sheets), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for model, tflops in (("H100", 989.0), ("H200", 989.0), ("A100", 312.0)):
        if model in name:
            return tflops
    return None


# ---------------------------------------------------------------------------------------------------------
# what the training loop reports

class TrainingLog:
    """What the loop reports: training records every --logging_steps and the evaluation records it
    hands over, to metrics.jsonl (main process), the trackers and the progress bar."""

    def __init__(self, run):  # a build.Run
        from tqdm.auto import tqdm

        self.run, acc = run, run.accelerator
        self.metrics = (MetricsFile(Path(run.cfg.io.output_dir) / "metrics.jsonl", keep_until=run.start_step)
                        if acc.is_main_process else None)
        self.meter = make_meter(run.cfg, acc, acc.unwrap_model(run.model).config)
        self.bar = tqdm(total=run.total_steps, initial=run.start_step, desc="train", disable=not acc.is_main_process,
                        dynamic_ncols=True)
        self.first = self.last = None

    def write(self, record: dict) -> None:
        self.run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.metrics is not None:
            self.metrics.write(record)

    def evaluation(self, record: dict) -> None:
        """An evaluation's record (held-out signal, retrieval on --eval_data), with a line for its retrieval."""
        if "eval/seconds" in record:
            logger.info("Step %d: retrieval %s (%.1f s)", record["step"], ", ".join(
                f"{k[len('eval/'):]} {v:.4f}" for k, v in record.items() if k.endswith("/ndcg@10")),
                record["eval/seconds"])
        self.write(record)

    def step_done(self, step: int, lr: Optional[float], skipped: int) -> None:
        cfg, acc = self.run.cfg, self.run.accelerator
        self.bar.update(1)
        if self.meter.steps and (step == 1 or step % cfg.job.logging_steps == 0 or step == self.run.total_steps):
            self.last = self.meter.flush(step, lr=lr, docs_seen=self.run.docs_seen, skipped_steps=skipped,
                                         loss_scale=acc.scaler.get_scale() if acc.scaler is not None else None)
            self.first = self.first or self.last
            self.bar.set_postfix(loss=f"{self.last['loss']:.3f}", acc=f"{self.last['contrastive_acc']:.2f}")
            self.write(self.last)

    def close(self) -> None:
        """The end of the run: the loss summary."""
        self.bar.close()
        if self.first and self.last:
            logger.info("Loss: first %.4f (step %d) -> last %.4f (step %d); contrastive accuracy %.3f -> %.3f",
                        self.first["loss"], self.first["step"], self.last["loss"], self.last["step"],
                        self.first["contrastive_acc"], self.last["contrastive_acc"])


def make_meter(cfg: TrainConfig, acc, model_config):
    """The metrics meter, with the model's FLOPs per token and, where known, the GPU's peak (MFU)."""
    flops = lambda avg_len: useful_flops_per_token(model_config, n_head_layers=cfg.model.n_head_layers, avg_len=avg_len,
                                                   mlm_fraction=cfg.data.mlm_probability, late_mlm=cfg.model.late_mlm)
    sixteen_bit = acc.mixed_precision in ("bf16", "fp16")
    return Meter(acc.device, flops, cfg.job.peak_tflops or (peak_tflops(acc.device) if sixteen_bit else None))
