"""Warm start: a Condenser from an HF masked-LM folder, one of our exports, or a reference Condenser folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from coco_accel.model.condenser import Condenser, ModelError

logger = logging.getLogger(__name__)

HEAD_FILE = "condenser_head.safetensors"  # ours, beside the export
REFERENCE_HEAD_FILE = "model.pt"  # luyug/Condenser and OpenMatch/COCO-DR: c_head.* keys


def _read_head_weights(folder: Path) -> tuple[Optional[dict], Optional[str]]:
    ours = folder / HEAD_FILE
    if ours.is_file():
        from safetensors.torch import load_file

        return load_file(str(ours)), str(ours)
    ref = folder / REFERENCE_HEAD_FILE
    if ref.is_file():
        state = torch.load(str(ref), map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if k.startswith("c_head.")}, str(ref)
    return None, None


def _copy_top_layers_into_head(model: Condenser, path: str) -> None:
    layers = model.family.layers
    if len(model.c_head) > len(layers):
        raise ModelError(f"{path}: --head_init copy needs at least --n_head_layers {len(model.c_head)} backbone layers; "
                         f"it has {len(layers)}. Use --head_init random or fewer head layers.")
    model.copy_backbone_into_head()


def _load_head(model: Condenser, state: dict) -> tuple[list, list]:
    """The head's layers (c_head.*) and, in pre-norm families, its norm (c_head_norm.*): missing and
    unexpected keys, by their full names."""
    missing, unexpected = [], []
    for prefix, module in (("c_head.", model.c_head), ("c_head_norm.", model.c_head_norm)):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if module is None:
            unexpected += [prefix + k for k in part]
            continue
        result = module.load_state_dict(part, strict=False)
        missing += [prefix + k for k in result.missing_keys]
        unexpected += [prefix + k for k in result.unexpected_keys]
    return missing, unexpected


def load_condenser(path: str, *, n_head_layers: int, skip_from: int, late_mlm: bool, strict_head: bool = False,
                   head_init: str = "random", length_bucket_width: int = 0, length_bucket_call_cost: int = -1,
                   pack_length: int = 0, pooling: str = "cls") -> Condenser:
    """Warm start from an HF MLM folder, one of our exports, or a reference Condenser folder.

    The head comes from condenser_head.safetensors (ours) or model.pt (the reference's c_head.* keys);
    without either it starts fresh (head_init "random": the backbone's initialisation; "copy": the
    backbone's last n_head_layers layers), which is logged (and refused with strict_head). Weights stored in
    16 bits are trained from fp32 master weights (autocast handles the 16-bit compute); fp32 and
    fp64 checkpoints keep their precision.
    """
    from transformers import AutoModelForMaskedLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{path}: no config.json. --model_name_or_path must be a local HF model folder "
                         "(nothing is downloaded).")
    mlm = AutoModelForMaskedLM.from_pretrained(str(folder), dtype="auto")
    if mlm.dtype in (torch.float16, torch.bfloat16):
        mlm = mlm.float()
    model = Condenser(mlm, n_head_layers=n_head_layers, skip_from=skip_from, late_mlm=late_mlm,
                      length_bucket_width=length_bucket_width, length_bucket_call_cost=length_bucket_call_cost,
                      pack_length=pack_length, pooling=pooling)
    state, source = _read_head_weights(folder)
    if state is None:
        if strict_head:
            raise ModelError(f"{path}: no Condenser head ({HEAD_FILE} or {REFERENCE_HEAD_FILE}) and --strict_head "
                             "is set. Warm-start from a Condenser checkpoint, or drop --strict_head.")
        if head_init == "copy":
            _copy_top_layers_into_head(model, path)
        logger.info("No Condenser head in %s: the %d head layers start from %s.", path, n_head_layers,
                    "copies of the backbone's last layers" if head_init == "copy" else "the backbone's initialisation")
        return model
    missing, unexpected = _load_head(model, state)
    if missing or unexpected:
        msg = f"{source}: head keys missing {sorted(missing)[:8]}{'...' if len(missing) > 8 else ''}, " \
              f"unexpected {sorted(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}"
        if strict_head:
            raise ModelError(msg + ". Check --n_head_layers against the checkpoint, or drop --strict_head.")
        logger.warning(msg)
    logger.info("Condenser head loaded from %s%s.", source,
                " (--head_init copy applies only to a warm start without a head)" if head_init == "copy" else "")
    return model
