"""Faults: a non-finite loss stops the run (or is skipped when allowed); a failed checkpoint write is a clear error."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, train_env

pytestmark = pytest.mark.slow


def _cmd(model, data, out, *extra):
    return [sys.executable, "coco_accel/train.py", "--output_dir", str(out), "--model_name_or_path", model,
            "--train_dir", str(data), "--per_device_train_batch_size", "4", "--max_steps", "4", "--skip_from", "2",
            "--save_steps", "0", "--max_grad_norm", "0", "--learning_rate", "1e30", "--report_to", "none", *extra]


def test_non_finite_loss_stops_with_the_step_and_parts(tmp_path, tiny_bert, span_data):
    proc = subprocess.run(_cmd(tiny_bert, span_data, tmp_path / "a"), cwd=REPO, env=train_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert "non-finite loss at step" in proc.stderr and "contrastive=" in proc.stderr
    assert "--max_nonfinite_skips" in proc.stderr and "Traceback" not in proc.stderr


def test_non_finite_steps_can_be_skipped(tmp_path, tiny_bert, span_data):
    proc = subprocess.run(_cmd(tiny_bert, span_data, tmp_path / "b", "--max_nonfinite_skips", "10"), cwd=REPO,
                          env=train_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step skipped (1 of 10 allowed)" in proc.stderr


class _FullDisk:
    """Stands in for the Accelerator at the one call that writes: the disk is full."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_checkpoint_write_leaves_the_previous_one_latest(tmp_path):
    from coco_accel.checkpoint import STATE_FILE, CheckpointError, latest_checkpoint, save_checkpoint

    good = tmp_path / "checkpoint-2"
    good.mkdir()
    (good / STATE_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match="No space left.*still .*checkpoint-2"):
        save_checkpoint(_FullDisk(), str(tmp_path), 4, {"step": 4})
    assert latest_checkpoint(str(tmp_path)) == good
