"""Corpora -> sentence spans -> token ids in Arrow shards (the job itself: `coco_accel/preprocess.py`)."""
