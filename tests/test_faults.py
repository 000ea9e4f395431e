"""Faults: a non-finite loss, a failed checkpoint write, a rank killed mid-step, a kill inside a checkpoint write."""

import errno
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_same_export, make_tiny_bert, run_main, train_args, train_env, wait_for_logged_lines

pytestmark = pytest.mark.slow


def _args(model, data, out, *extra):
    return train_args(model, data, out, *extra, per_device_train_batch_size=4, max_steps=4, save_steps=0,
                      max_grad_norm=0, learning_rate="1e30", report_to="none")


def test_non_finite_loss_stops_with_the_step_and_parts(tmp_path, tiny_bert, span_data):
    run = run_main("train", *_args(tiny_bert, span_data, tmp_path / "a"))
    assert run.returncode == 2
    assert "non-finite loss at step" in run.stderr and "contrastive=" in run.stderr
    assert "--max_nonfinite_skips" in run.stderr


def test_non_finite_steps_are_skipped_and_leave_the_weights(tmp_path, tiny_bert, span_data):
    """lr 1e30: step 1 updates the weights to ~1e30, every later loss is non-finite. Each of steps 2-4 is
    skipped: the checkpoints after steps 1, 2 and 3 hold the same weights (and the same as after step 4),
    which differ from the start's."""
    out = tmp_path / "b"
    run = run_main("train", *_args(tiny_bert, span_data, out, "--max_nonfinite_skips", "10", "--save_steps", "1"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert [f"step skipped ({n} of 10 allowed)" in run.stderr for n in (1, 2, 3, 4)] == [True, True, True, False]
    weights = [load_file(out / f"checkpoint-{step}" / "model.safetensors") for step in (1, 2, 3)]
    start = load_file(Path(tiny_bert) / "model.safetensors")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(weights[0][f"mlm.{name}"], start[name])  # step 1 moved it
    for later in weights[1:]:
        assert later.keys() == weights[0].keys()
        assert all(torch.equal(later[k], weights[0][k]) for k in later)


class _FullDisk:
    """Stands in for the Accelerator at the one call that writes: the disk is full."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_checkpoint_write_leaves_the_previous_one_latest(tmp_path):
    from coco_accel.training.checkpoint import STATE_FILE, CheckpointError, latest_checkpoint, save_checkpoint

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
    mid-run: node 0's rank, waiting in a collective, fails on the broken connection (--ddp_timeout bounds
    the wait where none breaks), so the whole job ends instead of hanging. Run again (its 2 ranks on one
    node this time: the same ranks, data and random streams), it resumes from the last checkpoint and ends
    with the weights of a run never interrupted."""
    from conftest import forked_run, forked_torchrun, free_port, torchrun

    timeout = 20

    def args(out):
        return _train_args(dropout_model, span_data, out, "--global_batch_size", "6", "--max_steps", "20",
                           "--save_steps", "3", "--ddp_timeout", str(timeout))

    def launch(out):
        port = free_port()
        return [subprocess.Popen(torchrun(1, 2, node, port) + args(out), cwd=REPO, env=train_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for node in range(2)]

    full = tmp_path / "full"
    forked_run(forked_torchrun(2) + args(full))
    out = tmp_path / "killed"
    agents = launch(out)
    wait_for_logged_lines(agents[0], out, 5)
    worker = subprocess.run(["pgrep", "-P", str(agents[1].pid)], capture_output=True, text=True).stdout.split()
    assert len(worker) == 1 and _logged(out) < 20, "the run must still be going when its rank is killed"
    os.kill(int(worker[0]), signal.SIGKILL)
    # a job that hung would wait out this guard (far beyond --ddp_timeout); one that ended says why
    errors = [a.communicate(timeout=600)[1] for a in agents]
    assert agents[0].returncode != 0 and agents[1].returncode != 0
    # node 0 learnt of it from its connection to the dead peer, not by waiting out a timeout
    assert re.search(r"Connection (reset|closed) by peer", errors[0]), errors[0][-3000:]
    assert 5 <= _logged(out) < 20
    forked_run(forked_torchrun(2) + args(out))
    assert_same_export(full, out)


def test_a_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, tokenizer, span_data):
    """kill -9 inside the write of checkpoint-3 (its model, optimizer and random states written into the hidden
    temporary folder, not yet renamed; tests/helpers/pause_in_checkpoint_write.py stops there and says so
    through a FIFO): the half-written folder never counts as a checkpoint, the next start removes it and
    resumes from checkpoint-2, and the run ends as an uninterrupted one."""
    model = make_tiny_bert(tmp_path / "model", tokenizer, layers=2, dropout=0.1)
    args = lambda out: _train_args(model, span_data, out, "--per_device_train_batch_size", "4", "--max_steps", "6",
                                   "--save_steps", "1")
    full = tmp_path / "full"
    assert run_main("train", *args(full)[1:]).returncode == 0
    out, fifo = tmp_path / "killed", tmp_path / "paused"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "tests/helpers/pause_in_checkpoint_write.py", *args(out)[1:]], cwd=REPO,
                            env=train_env(PAUSE_AT_STEP="3", PAUSE_FIFO=str(fifo)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:  # wait for the helper's line; a process that ends instead fails the test below
        while proc.poll() is None and not select.select([reader], [], [], 1.0)[0]:
            pass
        paused = proc.poll() is None and os.read(reader, 64) == b"paused\n"
    finally:
        os.close(reader)
    assert paused, f"the run ended (exit {proc.returncode}) before writing checkpoint-3"
    proc.kill()
    proc.wait()
    assert (out / ".checkpoint-3.tmp").is_dir() and not (out / "checkpoint-3").exists()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    run = run_main("train", *args(out)[1:])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Removed a half-written checkpoint" in run.stderr
    assert f"Resumed from {out / 'checkpoint-2'} at step 2" in run.stderr
    assert not (out / ".checkpoint-3.tmp").exists()
    assert_same_export(full, out)
