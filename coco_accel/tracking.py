"""Training metrics: accumulated on device between log steps, reduced across processes, written to metrics.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from coco_accel import dist
from coco_accel.step import StepParts

_PARTS = ("mlm_head", "mlm_backbone", "contrastive")


class Meter:
    """Sums of each step's parts since the last log: the losses on the device, the counts on the host, so
    that logging is the only host sync (a host number copied to a GPU each step would wait for it)."""

    def __init__(self, device: torch.device, flops_per_token: Optional[Callable[[float], float]] = None,
                 peak_tflops: Optional[float] = None):
        """flops_per_token(mean span length): model FLOPs per real token (`model.useful_flops_per_token`), for
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

    def add(self, parts: StepParts, grad_norm: Optional[torch.Tensor], overflow: bool = False) -> None:
        self.sums += torch.stack([parts.mlm_head.double(), parts.mlm_backbone.double(), parts.contrastive.double(),
                                  parts.correct.double()])
        for i, n in enumerate((parts.spans, parts.real_tokens, parts.computed_tokens)):
            self.counts[i] += n
        if grad_norm is not None:
            self.grad_norm_sum = self.grad_norm_sum + torch.as_tensor(grad_norm).detach().double()  # DeepSpeed: a float
            self.grad_norms += 1
        self.steps += 1
        self.overflows += int(overflow)

    def flush(self, step: int, lr: float, docs_seen: int, skipped_steps: int = 0,
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
            record["overflow_steps"] = self.overflows
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


def useful_flops_per_token(config, n_head_layers: int, avg_len: float, mlm_fraction: float, late_mlm: bool) -> float:
    """Forward + backward FLOPs per real token of the Condenser's computation as defined, padding and
    shortcuts aside: 6 x (the layers' matmul weights, attention (QK^T and AV) over spans of `avg_len`
    tokens, and the MLM transform and vocabulary projection at the masked fraction, head and backbone).
    The numerator of MFU."""
    h = config.hidden_size
    layers = config.num_hidden_layers + n_head_layers
    dense = layers * (4 * h * h + 2 * h * config.intermediate_size)
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
