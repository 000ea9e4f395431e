"""Zero-shot retrieval on BEIR folders, of an export or of the model in training (`python -m coco_accel.evaluation`)."""
