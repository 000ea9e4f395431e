"""A training run: the recipe, batches, the step, the engine, checkpoints (the loop: `coco_accel/train.py`)."""
