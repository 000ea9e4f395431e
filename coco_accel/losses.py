"""The loss terms as pure tensor functions: MLM on masked positions and the span contrastive loss.

No process-group calls here: the caller passes the gathered columns, this process's row offset in
them, and the normaliser. With `normalizer = global_count / world_size` each process's loss is its
share of the global mean, and averaging gradients over processes (DDP, ZeRO) gives exactly the
gradient of the single-process loss over the whole global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision activations are scored in fp32; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Summed token cross-entropy over `normalizer`.

    logits: [M, V] at the M masked positions only; targets: [M] original token ids.
    """
    if logits.shape[0] == 0:
        # Keep the graph connected (every parameter used) so DDP and ZeRO see the same parameters.
        return logits.sum() * 0.0
    return F.cross_entropy(at_least_fp32(logits), targets, reduction="sum") / normalizer


def sibling_index(index: torch.Tensor) -> torch.Tensor:
    """Spans are laid out in document pairs (2d, 2d+1): a span's positive is its pair partner."""
    return index ^ 1


def span_contrastive_loss(
    rows: torch.Tensor,
    columns: torch.Tensor,
    row_offset: int,
    normalizer: float,
    temperature: float = 1.0,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row must pick its sibling among all columns but itself.

    rows: [n, H] this process's CLS vectors; columns: [N, H] the whole global batch in global order,
    rows included at `row_offset`. Computed in fp32 whatever the autocast state: the reference's
    unnormalised dot products reach the hundreds, where bf16 keeps only ~3 significant digits.
    Returns (summed cross-entropy / normalizer, number of rows whose best column is the sibling).
    """
    with torch.autocast(device_type=rows.device.type, enabled=False):
        rows, columns = at_least_fp32(rows), at_least_fp32(columns)
        if normalize:
            rows, columns = F.normalize(rows, dim=-1), F.normalize(columns, dim=-1)
        scores = rows @ columns.T / temperature  # [n, N]
        own = torch.arange(rows.shape[0], device=rows.device) + row_offset
        is_self = torch.zeros_like(scores, dtype=torch.bool)
        is_self[torch.arange(rows.shape[0], device=rows.device), own] = True
        scores = scores.masked_fill(is_self, float("-inf"))
        targets = sibling_index(own)
        loss = F.cross_entropy(scores, targets, reduction="sum") / normalizer
        correct = (scores.detach().argmax(dim=1) == targets).sum()
    return loss, correct
