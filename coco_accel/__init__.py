"""coco-accel: continuous contrastive (coCondenser / COCO-DR) pretraining of dense retrievers."""

__version__ = "0.1.0"
