"""The training step, whole: `TrainStep` takes one host batch to the applied update.

Its forward and backward are `plain_step` or `cached_step` (the gradient cache), with the same signature
and result: both compute, on every process, its share of the loss over the GLOBAL batch (normalised by
global counts over the world size), so that gradient averaging across processes gives exactly the
single-process gradient. Then every process agrees on (stop, loss finite), and the update is clipped and
applied, or the step skipped. Logging belongs to the loop.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Optional, Sequence, Union

import numpy as np
import torch

from coco_accel.common import dist
from coco_accel.model.packing import to_device
from coco_accel.training.config import TrainConfig
from coco_accel.training.losses import at_least_fp32, decoder_cross_entropy, span_contrastive_loss
from coco_accel.training.optim import clip_grad_norm, step_counting_overflow

if TYPE_CHECKING:
    from coco_accel.training.batches import Batch

logger = logging.getLogger("coco_accel.train")


@dataclass(frozen=True)
class StepSettings:
    temperature: float = 1.0
    normalize: bool = False


@dataclass
class StepParts:
    """This process's shares of each loss part (detached); their MEAN over processes is the global mean."""

    mlm_head: torch.Tensor
    mlm_backbone: torch.Tensor
    contrastive: torch.Tensor
    correct: torch.Tensor  # this process's spans that ranked their sibling first
    spans: int  # this process's spans
    real_tokens: int  # non-padding tokens in this process's batch
    computed_tokens: int  # tokens the encoder computed: real ones plus the padding of packed rows or groups

    @property
    def loss(self) -> torch.Tensor:
        return self.mlm_head + self.mlm_backbone + self.contrastive


Count = Union[float, torch.Tensor]  # a normaliser: a number, or a 0-dim tensor on the device


def _global_counts(batch: dict, layout: np.ndarray) -> tuple[Count, Count]:
    """(masked tokens, spans) over the whole global batch, divided by the world size.

    Counted on the host from `layout`. A single process then has plain numbers, and several keep the
    all-reduced counts on the device: the losses divide by them there, so the step never waits for it.
    """
    masked, spans = float(layout[:, 1:].sum()), float(layout.shape[0])
    world = dist.world_size()
    if world == 1:
        return masked, spans
    # float64: the counts and their quotient by the world size are exact to 1e-16 (a float32 quotient by 3
    # is off by 3e-8, which an fp64 run would see in every gradient); the losses divide in their own dtype.
    total = dist.all_reduce_sum(to_device(np.array([masked, spans], dtype=np.float64), batch["labels"].device))
    return total[0] / world, total[1] / world


def _mlm_terms(out, mlm_norm: Count) -> tuple[torch.Tensor, torch.Tensor]:
    norm = mlm_norm.clamp_min(1e-12) if isinstance(mlm_norm, torch.Tensor) else max(mlm_norm, 1e-12)
    head = decoder_cross_entropy(out.head_features, out.decoder, out.targets, norm)
    if out.backbone_features is None:
        return head, torch.zeros((), device=head.device, dtype=head.dtype)
    return head, decoder_cross_entropy(out.backbone_features, out.decoder, out.targets, norm)


Backward = Callable[[torch.Tensor, bool], None]  # (loss, is the step's last backward)
Compute = Callable[[], ContextManager]  # what the forward and the losses run in: the trainer's autocast


def plain_step(model, batch: dict, backward: Backward, settings: StepSettings, *, layout: np.ndarray,
               compute: Compute = nullcontext, row_counts: Optional[Sequence[int]] = None) -> StepParts:
    """Encode the whole local batch with graph, score against the gathered global batch, backward once.

    batch: the rows' tensors on the device; layout: their `host_layout`, computed on the host (the
    counts, packing and length groups come from it, never from the device). row_counts: every
    process's span count, in rank order, when the host knows them (the trainer's batch plan does): the
    gather then needs no exchange of sizes, which would wait for the device. compute: the context of
    the forward and the losses, not of backward. The MLM vocabulary projection takes its matmul dtype
    from it: the trainer passes `accelerator.autocast`, because Accelerate's own autocast covers only
    the model's forward and left the projection (about 6% of the step's FLOPs) in fp32."""
    mlm_norm, span_norm = _global_counts(batch, layout)
    with compute():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    layout=layout)
        head, backbone = _mlm_terms(out, mlm_norm)
        columns, offset = dist.gather_with_grad(out.cls, row_counts)
        contrastive, correct = span_contrastive_loss(out.cls, columns, row_offset=offset, normalizer=span_norm,
                                                     temperature=settings.temperature, normalize=settings.normalize)
    backward(head + backbone + contrastive, True)
    return StepParts(head.detach(), backbone.detach(), contrastive.detach(), correct, layout.shape[0],
                     int(layout[:, 0].sum()), out.computed_tokens)


class _RandState:
    """Saves and restores the RNG streams a forward pass draws from (dropout), to replay it exactly."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def chunk_sizes(rows: int, size: int, row_counts: Optional[Sequence[int]] = None) -> list[int]:
    """How many spans each chunk of this process's `rows` gets: at most `size`, as even as possible, and
    the SAME NUMBER of chunks on every process (`row_counts`: every process's rows).

    Under ZeRO-2 every backward reduces gradients, so a process with one chunk more than another (a
    short last batch splits unevenly) would issue collectives the others never match. A process with
    fewer rows makes smaller chunks instead. That needs at least as many rows as chunks: with two
    spans per document and processes at most one document apart, true for any size >= 2.
    """
    most = max(row_counts) if row_counts else rows
    count = max(1, -(-most // size))
    if rows < count:
        raise ValueError(f"{rows} spans cannot fill the {count} chunks every process needs with chunks of {size} "
                         "spans: use --cache_chunk_size 2 or more")
    return [rows // count + (i < rows % count) for i in range(count)]


def _chunks(batch: dict, sizes: Sequence[int], layout: np.ndarray) -> list[tuple[dict, np.ndarray]]:
    """Row chunks of the given sizes with their layouts, each cut to its own longest row (unpacked rows
    then pad less)."""
    out = []
    start = 0
    for size in sizes:
        rows = layout[start:start + size]
        width = int(rows[:, 0].max())
        part = {k: batch[k][start:start + size, :width] for k in ("input_ids", "attention_mask", "labels")}
        out.append((part, rows[:, :1 + width]))
        start += size
    return out


def cached_step(model, batch: dict, backward: Backward, settings: StepSettings, *, layout: np.ndarray,
                chunk_size: int, no_sync: Optional[Callable] = None, compute: Compute = nullcontext,
                row_counts: Optional[Sequence[int]] = None) -> StepParts:
    """Gradient cache (Gao et al., 2021): the contrastive loss of the full global batch in bounded memory.

    1. Encode the local batch chunk by chunk without graph and without the head (CLS only), keeping each
       chunk's RNG state.
    2. Gather the CLS vectors, compute the contrastive loss on them, and keep d loss / d CLS.
    3. Re-encode each chunk with graph (same RNG state, so the same dropout) and backpropagate
       MLM + <CLS, cached gradient>: the sum of the chunks' gradients is the full-batch gradient.
    `no_sync` (DDP) defers the gradient all-reduce to the last chunk; under DeepSpeed, `backward`
    marks only the last chunk as the accumulation boundary (no loss scaling by chunk count: the
    chunks' losses already add up to the step's loss), and every process runs as many chunks as the
    others (`chunk_sizes`). `layout`, `compute` and `row_counts` as in plain_step.
    """
    mlm_norm, span_norm = _global_counts(batch, layout)
    chunks = _chunks(batch, chunk_sizes(layout.shape[0], chunk_size, row_counts), layout)
    device = batch["input_ids"].device
    states, reps = [], []
    with torch.no_grad(), compute():
        for part, rows in chunks:
            states.append(_RandState(device))
            # CLS only (no head), but with the labels: the backbone must compute what the replay's computes,
            # at the same places (packed rows run the last layer at the masked slots), to draw the same dropout.
            reps.append(model(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                              labels=part["labels"], layout=rows, cls_only=True).cls)
    local = at_least_fp32(torch.cat(reps)).requires_grad_(True)
    columns, offset = dist.gather_with_grad(local, row_counts)
    contrastive, correct = span_contrastive_loss(local, columns, row_offset=offset, normalizer=span_norm,
                                                 temperature=settings.temperature, normalize=settings.normalize)
    (rep_grad,) = torch.autograd.grad(contrastive, local)
    head_total = backbone_total = None  # sums in the losses' own dtype (fp64 runs report fp64 parts)
    start = computed = 0
    for i, ((part, rows), state) in enumerate(zip(chunks, states)):
        state.restore()
        last = i == len(chunks) - 1
        ctx = no_sync() if (no_sync is not None and not last) else nullcontext()
        with ctx:
            with compute():
                out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                            labels=part["labels"], layout=rows)
                head, backbone = _mlm_terms(out, mlm_norm)
                grad = rep_grad[start:start + out.cls.shape[0]]
                surrogate = (at_least_fp32(out.cls) * grad).sum()
            backward(head + backbone + surrogate, last)
        start += out.cls.shape[0]
        computed += out.computed_tokens
        head_total = head.detach() if head_total is None else head_total + head.detach()
        backbone_total = backbone.detach() if backbone_total is None else backbone_total + backbone.detach()
    return StepParts(head_total, backbone_total, contrastive.detach(), correct, layout.shape[0],
                     int(layout[:, 0].sum()), computed)


# ---------------------------------------------------------------------------------------------------------
# the loop's step


@dataclass
class StepOutcome:
    """What one optimizer step of the loop did."""

    parts: StepParts
    stop: bool  # a stop was requested on some process: every process stops after this step
    applied: bool  # the update was applied; False: the loss was not finite and the step skipped
    grad_norm: Optional[torch.Tensor] = None  # before clipping, where clipping is on
    overflow: Optional[torch.Tensor] = None  # fp16: 1 when the loss scaler skipped the update (on the device)
    lr: Optional[float] = None  # the learning rate the update used


class TrainStep:
    """The loop's step, whole: a host batch in, the update applied. Forward and backward (plain, or
    gradient-cached with --cache_chunk_size), the agreement of every process on (stop, loss finite),
    clipping, the optimizer's and the scheduler's steps, or a step skipped for a non-finite loss."""

    def __init__(self, cfg: TrainConfig, accelerator, model, optimizer, scheduler):
        self.cfg, self.accelerator, self.model = cfg, accelerator, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.deepspeed = accelerator.state.deepspeed_plugin is not None
        self.settings = StepSettings(cfg.model.temperature, cfg.model.normalize)
        self.skipped = 0  # steps skipped so far for a non-finite loss

    def __call__(self, batch: Batch, stop_requested: bool) -> StepOutcome:
        acc = self.accelerator
        tensors = {k: v.to(acc.device, non_blocking=True) for k, v in batch.tensors.items()}
        parts = self.forward_backward(tensors, batch.layout, batch.row_counts)
        stop, finite = self._agree(stop_requested, parts.loss)
        if finite:
            outcome = self._update(parts, stop)
        else:
            self._skip(batch.step + 1, parts)
            self.optimizer.zero_grad(set_to_none=True)
            outcome = StepOutcome(parts, stop, applied=False)
        self.scheduler.step()
        return outcome

    def forward_backward(self, tensors: dict, layout: np.ndarray, row_counts: Sequence[int]) -> StepParts:
        """This process's loss parts over the global batch, its gradients accumulated (not yet reduced
        under DeepSpeed, which reduces in its step)."""
        if self.cfg.compute.cache_chunk_size > 0:
            multi_ddp = self.accelerator.num_processes > 1 and not self.deepspeed
            return cached_step(self.model, tensors, self._backward, self.settings, layout=layout,
                               chunk_size=self.cfg.compute.cache_chunk_size, row_counts=row_counts,
                               no_sync=(lambda: self.accelerator.no_sync(self.model)) if multi_ddp else None,
                               compute=self.accelerator.autocast)
        return plain_step(self.model, tensors, self._backward, self.settings, layout=layout, row_counts=row_counts,
                          compute=self.accelerator.autocast)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.deepspeed:  # DeepSpeed owns the accumulation boundary and steps inside backward at the last one
            self.accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last)
        else:
            self.accelerator.backward(loss)

    def _agree(self, stop_requested: bool, loss: torch.Tensor) -> tuple[bool, bool]:
        """(stop now, loss finite), the same on every process: one tiny all-reduce per step, the only host
        sync outside logging."""
        device = self.accelerator.device
        flags = torch.stack([torch.tensor(float(stop_requested), device=device, dtype=torch.float64), loss.double()])
        control = dist.all_reduce_sum(flags).tolist()
        return control[0] > 0, math.isfinite(control[1])

    def _update(self, parts: StepParts, stop: bool) -> StepOutcome:
        """Clip, step the optimizer, clear the gradients."""
        grad_norm = self._clip() if self.cfg.optim.max_grad_norm > 0 else None
        lr = self.scheduler.get_last_lr()[0]
        overflow = step_counting_overflow(self.optimizer, self.accelerator.scaler)
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(parts, stop, applied=True, grad_norm=grad_norm, overflow=overflow, lr=lr)

    def _clip(self) -> torch.Tensor:
        """The norm before clipping. DeepSpeed clips inside its step and reports its own norm; otherwise the
        gradients are unscaled (fp16) and clipped by `optim.clip_grad_norm`."""
        acc, max_norm = self.accelerator, self.cfg.optim.max_grad_norm
        if self.deepspeed:
            return acc.clip_grad_norm_(self.model.parameters(), max_norm)
        acc.unscale_gradients()
        return clip_grad_norm(self.model.parameters(), max_norm)

    def _skip(self, step: int, parts: StepParts) -> None:
        allowed = self.cfg.job.max_nonfinite_skips
        detail = (f"mlm_head={parts.mlm_head.item():.4g}, mlm_backbone={parts.mlm_backbone.item():.4g}, "
                  f"contrastive={parts.contrastive.item():.4g} (this process's shares)")
        if self.skipped >= allowed:
            raise FloatingPointError(
                f"non-finite loss at step {step}: {detail}. Lower --learning_rate, prefer bf16 to fp16, or allow "
                f"skipping with --max_nonfinite_skips (now {allowed}).")
        self.skipped += 1
        logger.warning("Non-finite loss at step %d (%s): step skipped (%d of %d allowed).", step, detail,
                       self.skipped, allowed)
