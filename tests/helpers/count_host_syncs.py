"""Runs coco_accel/train.py (same flags) with every call that makes the host wait for the device counted
inside the training step (its forward and backward, and the gradient clipping), per process; writes
{rank, steps, counts, control} to $SYNC_COUNTS_DIR/rank<R>.json.

On the CPU nothing waits, so the calls themselves are counted: .item(), .tolist(), bool/int/float of a
tensor, .cpu(), .nonzero() (a device-side shape the host must read). `control` counts the same calls in
a gather whose sizes are NOT given, to show the counter sees the exchange it replaced.
"""

import json
import os
import sys

import torch

from coco_accel import train
from coco_accel.common import dist
from coco_accel.training import step

ACTIVE = [False]
COUNTS: dict = {}
SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "nonzero")


def _counting(name, real):
    def call(*args, **kwargs):
        if ACTIVE[0]:
            COUNTS[name] = COUNTS.get(name, 0) + 1
        return real(*args, **kwargs)
    return call


def _windowed(fn, calls):
    def run(*args, **kwargs):
        ACTIVE[0] = True
        try:
            return fn(*args, **kwargs)
        finally:
            ACTIVE[0] = False
            calls[0] += 1
    return run


def main() -> int:
    for name in SYNCING:
        setattr(torch.Tensor, name, _counting(name, getattr(torch.Tensor, name)))
    steps = [0]
    step.TrainStep.forward_backward = _windowed(step.TrainStep.forward_backward, steps)
    step.TrainStep._clip = _windowed(step.TrainStep._clip, [0])
    code = train.main(sys.argv[1:])
    in_steps = dict(COUNTS)
    COUNTS.clear()
    ACTIVE[0] = True
    dist.gather_with_grad(torch.zeros(3, 2))  # sizes exchanged: the call this test must be able to see
    ACTIVE[0] = False
    out = os.path.join(os.environ["SYNC_COUNTS_DIR"], f"rank{dist.rank()}.json")
    with open(out, "w") as fh:
        json.dump({"rank": dist.rank(), "steps": steps[0], "counts": in_steps, "control": dict(COUNTS)}, fh)
    return code


if __name__ == "__main__":
    train._exit(main())
