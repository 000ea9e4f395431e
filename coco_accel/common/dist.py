"""Process-group facts and collectives, always by GLOBAL rank; every function is a no-op in one process."""

from __future__ import annotations

import contextlib
import socket
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (never the local rank: on several nodes they differ)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes, without autograd (counts and logged values)."""
    if not is_distributed():
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every process's row count, in rank order."""
    if not is_distributed():
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return [int(x.item()) for x in out]


def all_gather_equal(t: torch.Tensor) -> list[torch.Tensor]:
    """Every process's tensor of this same shape, in rank order, without autograd."""
    if not is_distributed():
        return [t]
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return out


class _GatherRows(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for each copy and hands the owner its part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # x: [n, ...] (same n on every process)
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)  # [world, n, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[rank()]


def gather_with_grad(x: torch.Tensor, sizes: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, int]:
    """Concatenate every process's rows in rank order, with gradients flowing back to their owners.

    Returns (all rows [sum_n, ...], this process's first row in them). Row counts may differ between
    processes (a short last batch): rows are padded to the largest count for the collective and cut
    after it. `sizes`: every process's row count when the caller knows them on the host (the batch
    plan does); otherwise they are exchanged first, which waits for the device. Plain
    `dist.all_gather` and `accelerator.gather` carry no gradient back to the other processes'
    inputs, which would silently drop most of the contrastive gradient.
    """
    if not is_distributed():
        return x, 0
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], x.device)
    elif len(sizes) != world_size() or sizes[rank()] != x.shape[0]:
        raise ValueError(f"row counts {list(sizes)} do not match this process group (rank {rank()} of "
                         f"{world_size()} holds {x.shape[0]} rows)")
    largest = max(sizes)
    padded = x
    if x.shape[0] < largest:
        pad = x.new_zeros((largest - x.shape[0],) + tuple(x.shape[1:]))
        padded = torch.cat([x, pad], dim=0)
    parts = _GatherRows.apply(padded)
    rows = torch.cat([parts[i, :n] for i, n in enumerate(sizes)], dim=0)
    return rows, sum(sizes[: rank()])


class PeerFailed(RuntimeError):
    """Raised on the processes that passed a block another process failed; the message is that process's."""


@contextlib.contextmanager
def fail_together():
    """Leave the block the same way on every process: if it raised on any, it raises on all.

    Without it, a process that finds a bad input (a folder missing on its node, say) exits while the
    others go on into the next collective and wait there until the group's timeout. At the end of the
    block every process exchanges its outcome once (a message, or nothing); a process that failed
    re-raises its own error, the others raise PeerFailed naming the first failed process, its host and
    its message. Nothing may run a collective inside the block.
    """
    failure: Optional[Exception] = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - exchanged, then re-raised unchanged
        failure = err
    if is_distributed():
        mine = None if failure is None else (socket.gethostname(), str(failure))
        outcomes: list = [None] * world_size()
        dist.all_gather_object(outcomes, mine)
        failed = [(r, m) for r, m in enumerate(outcomes) if m is not None]
    else:
        failed = []
    if failure is not None:
        raise failure
    if failed:
        first, (host, message) = failed[0]
        others = f" ({len(failed) - 1} other process(es) failed too)" if len(failed) > 1 else ""
        raise PeerFailed(f"process {first} of {world_size()}, on {host}, stopped{others}: {message}")
