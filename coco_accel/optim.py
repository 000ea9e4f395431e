"""AdamW with the reference's decay groups, and the linear warm-up / linear decay schedule."""

from __future__ import annotations

import math

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


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """Build after the model is on its device: fused AdamW is chosen when the parameters are on CUDA."""
    groups = decay_groups(model, weight_decay)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    # Fused AdamW is one kernel for all parameters on CUDA; on CPU the foreach path is the fast one.
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             fused=True if on_cuda else None)


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    return warmup_steps if warmup_steps > 0 else math.ceil(total_steps * warmup_ratio)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total_steps: int):
    """Linear warm-up from 0 to the peak over `warmup` steps, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup:  # as transformers' get_linear_schedule_with_warmup: the first step runs at lr 0
            return step / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
