"""Faults: a non-finite loss, a failed checkpoint write, a rank killed mid-step, a kill inside a checkpoint write."""

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_same_export, make_tiny_bert, train_args, train_env

pytestmark = pytest.mark.slow


def _cmd(model, data, out, *extra):
    return [sys.executable, "coco_accel/train.py", *train_args(
        model, data, out, *extra, per_device_train_batch_size=4, max_steps=4, save_steps=0, max_grad_norm=0,
        learning_rate="1e30", report_to="none")]


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


def _train_args(model, data, out, *extra):
    return ["coco_accel/train.py", *train_args(model, data, out, *extra, late_mlm=True, logging_steps=1,
                                                report_to="none", learning_rate="1e-3")]


def _logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory, tokenizer):
    return make_tiny_bert(tmp_path_factory.mktemp("fault_model"), tokenizer, layers=2, dropout=0.1)


def test_a_rank_killed_mid_step_ends_the_job_and_the_rerun_resumes_exactly(tmp_path, dropout_model, span_data):
    """Two nodes of one process each (two torchrun agents, as on a cluster). kill -9 of node 1's rank
    mid-run: node 0's rank, waiting in a collective, fails within --ddp_timeout, so the whole job ends
    instead of hanging. The same command run again resumes from the last checkpoint and ends with the
    weights of a run never interrupted."""
    from conftest import free_port, torchrun

    timeout = 20

    def launch(out):
        port = free_port()
        args = _train_args(dropout_model, span_data, out, "--global_batch_size", "6", "--max_steps", "40",
                           "--save_steps", "3", "--ddp_timeout", str(timeout))
        return [subprocess.Popen(torchrun(1, 2, node, port) + args, cwd=REPO, env=train_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for node in range(2)]

    full = tmp_path / "full"
    assert [p.wait(timeout=600) for p in launch(full)] == [0, 0]
    out = tmp_path / "killed"
    agents = launch(out)
    deadline = time.time() + 300
    while _logged(out) < 5 and time.time() < deadline and all(a.poll() is None for a in agents):
        time.sleep(0.05)
    worker = subprocess.run(["pgrep", "-P", str(agents[1].pid)], capture_output=True, text=True).stdout.split()
    assert len(worker) == 1 and _logged(out) < 40, "the run must still be going when its rank is killed"
    killed_at = time.time()
    os.kill(int(worker[0]), signal.SIGKILL)
    codes = [a.wait(timeout=timeout + 60) for a in agents]
    ended = time.time() - killed_at
    assert codes[0] != 0 and codes[1] != 0
    assert ended < timeout + 30, f"the job took {ended:.0f} s to end after the kill (--ddp_timeout {timeout})"
    stopped_at = _logged(out)
    assert 5 <= stopped_at < 40
    assert [p.wait(timeout=600) for p in launch(out)] == [0, 0]
    assert_same_export(full, out)


def test_a_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, tokenizer, span_data):
    """kill -9 while checkpoint-N is being written (a model large enough that writing takes a while): the
    half-written folder never counts as a checkpoint, the next start removes it and resumes from N-1,
    and the run ends as an uninterrupted one."""
    model = make_tiny_bert(tmp_path / "model", tokenizer, layers=2, hidden=128, dropout=0.1)
    args = lambda out: [sys.executable, *_train_args(model, span_data, out, "--per_device_train_batch_size", "4",
                                                     "--max_steps", "8", "--save_steps", "1")]
    full = tmp_path / "full"
    subprocess.run(args(full), cwd=REPO, env=train_env(), check=True, capture_output=True)
    partial = re.compile(r"^\.checkpoint-(\d+)\.tmp$")
    for attempt in range(5):
        out = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen(args(out), cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        hit = None
        while proc.poll() is None and hit is None:
            if out.is_dir():
                hit = next((int(m.group(1)) for m in map(partial.match, os.listdir(out)) if m and int(m.group(1)) >= 2),
                           None)
        if hit is not None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        if hit is not None and (out / f".checkpoint-{hit}.tmp").is_dir() and not (out / f"checkpoint-{hit}").exists():
            break  # killed inside the write
    else:
        pytest.fail("never killed inside a checkpoint write in 5 runs")
    assert (out / f"checkpoint-{hit - 1}" / "trainer_state.json").is_file()
    run = subprocess.run(args(out), cwd=REPO, env=train_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Removed a half-written checkpoint" in run.stderr
    assert f"Resumed from {out / f'checkpoint-{hit - 1}'} at step {hit - 1}" in run.stderr
    assert not (out / f".checkpoint-{hit}.tmp").exists()
    assert_same_export(full, out)
