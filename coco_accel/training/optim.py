"""The optimizer (AdamW with the reference's decay groups, or plain SGD for checks) and the linear schedule."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: biases and normalisation weights are exempt (by module type)."""
    no_decay: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm))
        for name, param in module.named_parameters(recurse=False):
            if is_norm or name == "bias":
                no_decay.add(id(param))
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float,
                    name: str = "adamw") -> torch.optim.Optimizer:
    """Build after the model is on its device: fused AdamW is chosen when the parameters are on CUDA.

    name="sgd": plain SGD (no momentum), whose update is the gradient times the rate: parity checks
    between runs then compare gradients, which AdamW's per-element normalisation would hide (a
    uniform scale error) or inflate (noise on near-zero gradients)."""
    groups = decay_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=0.0)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    # Fused AdamW is one kernel for all parameters on CUDA; on CPU the foreach path is the fast one.
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             fused=True if on_cuda else None)


def step_counting_overflow(optimizer, scaler) -> Optional[torch.Tensor]:
    """Step the (Accelerate-wrapped) optimizer; with an fp16 loss scaler, return a 0-dim tensor that is 1
    when the scaler found inf/NaN gradients and the update was skipped, else 0 (None without a scaler).

    The scaler halves its scale exactly on such a step (backoff_factor < 1), so comparing the scale before and
    after tells, on the device and without a host sync. Accelerate's `step_was_skipped` cannot: it notes
    whether the optimizer's step was called, and a fused optimizer's always is (it is handed `found_inf` and
    skips the update inside its kernel)."""
    scale = getattr(scaler, "_scale", None) if scaler is not None else None
    if scale is None:  # no scaler, or one that has not scaled a loss yet (nothing to skip)
        optimizer.step()
        return None
    before = scale.clone()
    optimizer.step()
    return (scaler._scale < before).to(torch.int64)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip gradients to a global norm and return the norm before clipping (torch's clip_grad_norm_).

    On the CPU the norm is accumulated in float64: torch's float32 CPU reduction of the squares of a
    BERT embedding gradient (30k x H elements) comes out ~1e-4 low, kernel-dependent, so the logged
    norm and the clipping would differ between machines. GPU reductions are accurate as they are.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    grads = [p.grad for p in params]
    if grads[0].device.type == "cpu":
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64)
                                                      for g in grads]))
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(grads[0].dtype))
    else:
        total = torch.nn.utils.get_total_norm(grads)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    return warmup_steps if warmup_steps > 0 else math.ceil(total_steps * warmup_ratio)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total_steps: int):
    """Linear warm-up from 0 to the peak over `warmup` steps, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup:  # as transformers' get_linear_schedule_with_warmup: the first step runs at lr 0
            return step / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
