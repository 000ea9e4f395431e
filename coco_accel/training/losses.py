"""The loss terms as pure tensor functions: MLM on masked positions and the span contrastive loss.

No process-group calls here: the caller passes the gathered columns, this process's row offset in
them, and the normaliser. With `normalizer = global_count / world_size` each process's loss is its
share of the global mean, and averaging gradients over processes (DDP, ZeRO) gives exactly the
gradient of the single-process loss over the whole global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision activations are scored in fp32; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def over(total: torch.Tensor, normalizer) -> torch.Tensor:
    """total / normalizer in total's dtype: a normaliser on the device may be float64 (exact counts over
    the world size), and two 0-dim tensors would promote the loss to it."""
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(total.dtype)
    return total / normalizer


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Summed token cross-entropy over `normalizer`.

    logits: [M, V] at the M masked positions only; targets: [M] original token ids.
    """
    if logits.shape[0] == 0:
        # Keep the graph connected (every parameter used) so DDP and ZeRO see the same parameters.
        return logits.sum() * 0.0
    return over(F.cross_entropy(at_least_fp32(logits), targets, reduction="sum"), normalizer)


# Rows of logits per chunk in decoder_cross_entropy: 2**27 fp32 elements (512 MiB) at most per chunk.
DECODER_CHUNK_ELEMENTS = 2 ** 27


def decoder_cross_entropy(features: torch.Tensor, decoder: nn.Linear, targets: torch.Tensor,
                          normalizer) -> torch.Tensor:
    """`masked_lm_loss(decoder(features), targets, normalizer)` without ever holding all the logits.

    features: [M, H] the MLM head's transformed states at the masked positions; decoder: the tied
    vocabulary projection. With ~22k masked positions and a 30k vocabulary, BERT's logits, their fp32
    copy and their gradient take ~13 GiB for the head and backbone together. Here the logits exist one
    chunk of rows at a time: each chunk's loss and its gradients (features, weight, bias) are computed
    at once, in the matmul dtype that autocast would use, with the softmax in fp32, and backward only
    scales them. The same FLOPs as the plain computation.

    Falls back to the plain computation when no gradient is wanted, when there is nothing to predict,
    and under ZeRO-3 (whose parameters are only whole inside their module's forward).
    """
    weight, bias = decoder.weight, decoder.bias
    partitioned = hasattr(weight, "ds_id")  # DeepSpeed ZeRO-3
    wants_grad = torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad)
    if features.shape[0] == 0 or partitioned or not wants_grad or bias is None:
        return masked_lm_loss(decoder(features), targets, normalizer)
    device_type = features.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    chunk = max(1, DECODER_CHUNK_ELEMENTS // weight.shape[0])
    return over(_DecoderCrossEntropy.apply(features, weight, bias, targets, dtype, chunk), normalizer)


class _DecoderCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `features @ weight.T + bias` against targets, with the gradients computed
    chunk by chunk in forward (see decoder_cross_entropy)."""

    @staticmethod
    def forward(ctx, features, weight, bias, targets, dtype, chunk):
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # softmax and sums
        with torch.autocast(features.device.type, enabled=False):
            w, b = weight.to(dtype), bias.to(dtype)
            total = torch.zeros((), dtype=acc, device=features.device)
            grad_features = torch.empty_like(features)
            grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(acc, weight.dtype), device=weight.device)
            grad_bias = torch.zeros(bias.shape, dtype=grad_weight.dtype, device=bias.device)
            for start in range(0, features.shape[0], chunk):
                f = features[start:start + chunk].to(dtype)
                t = targets[start:start + chunk]
                # log-softmax in `acc` straight from the 16-bit logits (no separate fp32 copy of them)
                logp = torch.log_softmax(torch.addmm(b, f, w.T), dim=1, dtype=acc)  # [c, V]
                rows = torch.arange(t.shape[0], device=t.device)
                at_target = logp[rows, t]
                total -= at_target.sum()
                # d loss / d logits = softmax - one-hot, written straight in the matmul dtype: no second
                # [c, V] tensor in `acc` (on a GPU this loop is bound by memory traffic, not by its matmuls)
                g = logp.exp_() if dtype == acc else torch.exp(logp, out=torch.empty_like(logp, dtype=dtype))
                g[rows, t] = (at_target.exp() - 1.0).to(dtype)
                del logp
                grad_features[start:start + chunk] = g @ w
                grad_weight += (g.T @ f).to(grad_weight.dtype)
                grad_bias += g.sum(dim=0, dtype=grad_bias.dtype)
        ctx.save_for_backward(grad_features, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_features, grad_weight, grad_bias = ctx.saved_tensors
        return (grad_features * grad_total.to(grad_features.dtype), grad_weight * grad_total.to(grad_weight.dtype),
                grad_bias * grad_total.to(grad_bias.dtype), None, None, None)


def sibling_index(index: torch.Tensor) -> torch.Tensor:
    """Spans are laid out in document pairs (2d, 2d+1): a span's positive is its pair partner."""
    return index ^ 1


def span_contrastive_loss(
    rows: torch.Tensor,
    columns: torch.Tensor,
    *,
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
        loss = over(F.cross_entropy(scores, targets, reduction="sum"), normalizer)
        correct = (scores.detach().argmax(dim=1) == targets).sum()
    return loss, correct
