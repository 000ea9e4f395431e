"""`python -m coco_accel.checkpoint universal CHECKPOINT` (also `coco-checkpoint`): checkpoint tools."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from coco_accel.training.checkpoint import CheckpointError, to_universal

logger = logging.getLogger("coco_accel.checkpoint")


def main(argv=None) -> int:
    """`python -m coco_accel.checkpoint universal CHECKPOINT`: make a ZeRO checkpoint loadable on any process count."""
    p = argparse.ArgumentParser(prog="python -m coco_accel.checkpoint", description=main.__doc__)
    p.add_argument("command", choices=["universal"])
    p.add_argument("checkpoint", help="a checkpoint-STEP folder written under DeepSpeed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        to_universal(Path(args.checkpoint))
    except CheckpointError as err:
        logger.error("%s", err)
        return 2
    logger.info("%s is now a universal checkpoint: resume it on any number of processes.", args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
