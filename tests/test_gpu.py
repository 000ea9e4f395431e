"""GPU-only paths: fp16 dynamic loss scaling, bf16, NCCL. Skipped without CUDA (run them on a GPU machine:
`.venv/bin/python -m pytest -q -m gpu tests/test_gpu.py`)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _run(cmd, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=900)
    return [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]


def _flags(out, model, data, *extra):
    return ["coco_accel/train.py", "--output_dir", str(out), "--model_name_or_path", model, "--train_dir", str(data),
            "--per_device_train_batch_size", "8", "--max_steps", "6", "--logging_steps", "2", "--save_steps", "0",
            "--skip_from", "2", "--late_mlm", "--report_to", "none", *extra]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_single_gpu_mixed_precision(tmp_path, tiny_bert, span_data, precision):
    out = tmp_path / precision
    records = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    "accelerate_configs/single_gpu.yaml", "--mixed_precision", precision,
                    *_flags(out, tiny_bert, span_data)], out)
    assert all(math.isfinite(r["loss"]) for r in records)
    if precision == "fp16":
        assert all(r["loss_scale"] > 0 for r in records) and "overflow_steps" in records[-1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_nccl_two_gpus_equal_one(tmp_path, tiny_bert, span_data):
    one = _run([sys.executable, *_flags(tmp_path / "one", tiny_bert, span_data)], tmp_path / "one")
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                *_flags(tmp_path / "two", tiny_bert, span_data, "--global_batch_size", "8")], tmp_path / "two")
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
