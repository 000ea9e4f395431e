"""Runs coco_accel/train.py (same flags) and stops inside the write of checkpoint $PAUSE_AT_STEP: once
Accelerate has written the model, optimizer and random states into the hidden temporary folder, and
before the counters are added and the folder renamed into place, it writes a line to the FIFO $PAUSE_FIFO
(the test's signal to kill it) and waits there for good."""

import os
import signal
import sys

from accelerate import Accelerator

from coco_accel import train


def main() -> int:
    real_save_state = Accelerator.save_state
    pause_in = f".checkpoint-{os.environ['PAUSE_AT_STEP']}.tmp"

    def save_state(self, output_dir=None, *args, **kwargs):
        result = real_save_state(self, output_dir, *args, **kwargs)
        if output_dir is not None and os.path.basename(str(output_dir).rstrip("/")) == pause_in:
            with open(os.environ["PAUSE_FIFO"], "w") as fifo:
                fifo.write("paused\n")
            while True:
                signal.pause()
        return result

    Accelerator.save_state = save_state
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    train._exit(main())
