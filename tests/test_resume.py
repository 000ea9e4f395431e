"""Exact resume: a run interrupted (crash or SIGTERM) and resumed ends with the weights of an uninterrupted run."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, exported_weights, free_port, make_tiny_bert, train_env

pytestmark = pytest.mark.slow


def _cmd(model, data, out, steps, *extra):
    return [sys.executable, "coco_accel/train.py", "--output_dir", str(out), "--model_name_or_path", model,
            "--train_dir", str(data), "--per_device_train_batch_size", "6", "--max_steps", str(steps),
            "--logging_steps", "1", "--skip_from", "2", "--late_mlm", "--learning_rate", "1e-3",
            "--warmup_ratio", "0.3", "--weight_decay", "0.01", *extra]


def _wait_for_logged_steps(proc, out: Path, n: int, timeout: float) -> None:
    """Until the run has logged n lines (or ended, or the time is up)."""
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        time.sleep(0.05)


def _assert_equal(a: Path, b: Path) -> None:
    wa, wb = exported_weights(a), exported_weights(b)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst == 0.0, f"largest weight difference {worst:.2e}"


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    # Dropout on: resuming must also restore the random streams.
    return make_tiny_bert(tmp_path_factory.mktemp("resume_model"), tokenizer, layers=2, dropout=0.1)


def test_resumed_run_equals_uninterrupted(tmp_path, model, span_data):
    full = tmp_path / "full"
    subprocess.run(_cmd(model, span_data, full, 6, "--save_steps", "2", "--save_total_limit", "2"),
                   cwd=REPO, env=train_env(), check=True)
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # A crash right after checkpoint-2: only that checkpoint (and the log so far) survive.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-2", crashed / "checkpoint-2")
    shutil.copy(full / "metrics.jsonl", crashed / "metrics.jsonl")
    (crashed / ".checkpoint-4.tmp").mkdir()  # a half-written checkpoint is never taken for the latest
    subprocess.run(_cmd(model, span_data, crashed, 6, "--save_steps", "2"), cwd=REPO, env=train_env(), check=True)
    _assert_equal(full, crashed)
    steps = [json.loads(line)["step"] for line in open(crashed / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    a = [json.loads(line)["loss"] for line in open(full / "metrics.jsonl")]
    b = [json.loads(line)["loss"] for line in open(crashed / "metrics.jsonl")]
    assert a == b


def test_sigterm_writes_a_checkpoint_and_resumes_exactly(tmp_path, model, span_data):
    full = tmp_path / "full"
    subprocess.run(_cmd(model, span_data, full, 30, "--save_steps", "0"), cwd=REPO, env=train_env(), check=True)
    out = tmp_path / "preempted"
    proc = subprocess.Popen(_cmd(model, span_data, out, 30, "--save_steps", "0"), cwd=REPO, env=train_env())
    _wait_for_logged_steps(proc, out, 3, timeout=120)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    stopped = [p.name for p in out.glob("checkpoint-*")]
    assert len(stopped) == 1 and (out / "PREEMPTED").is_file()
    assert int(stopped[0].split("-")[1]) < 30, "the signal arrived after the run ended; nothing was tested"
    subprocess.run(_cmd(model, span_data, out, 30, "--save_steps", "0"), cwd=REPO, env=train_env(), check=True)
    assert not (out / "PREEMPTED").exists()
    _assert_equal(full, out)


def test_refuses_a_non_empty_output_dir_without_checkpoints(tmp_path, model, span_data):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = subprocess.run(_cmd(model, span_data, out, 2), cwd=REPO, env=train_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "--overwrite_output_dir" in proc.stderr


def test_data_loader_workers_do_not_change_the_run(tmp_path, model, span_data):
    for workers in (0, 2):
        subprocess.run(_cmd(model, span_data, tmp_path / f"w{workers}", 3, "--save_steps", "0",
                            "--dataloader_num_workers", str(workers)), cwd=REPO, env=train_env(), check=True)
    _assert_equal(tmp_path / "w0", tmp_path / "w2")


def test_stop_file_writes_a_checkpoint_and_resumes_exactly(tmp_path, model, span_data):
    """What slurm/train.sbatch does on SIGUSR1: a STOP file in the output folder."""
    full = tmp_path / "full"
    subprocess.run(_cmd(model, span_data, full, 20, "--save_steps", "0"), cwd=REPO, env=train_env(), check=True)
    out = tmp_path / "stopped"
    out.mkdir()
    (out / "STOP").write_text("")  # stale from an earlier job: removed at start, not obeyed
    proc = subprocess.Popen(_cmd(model, span_data, out, 20, "--save_steps", "0"), cwd=REPO, env=train_env())
    _wait_for_logged_steps(proc, out, 3, timeout=120)
    (out / "STOP").write_text("")
    assert proc.wait(timeout=120) == 75
    assert "STOP file" in (out / "PREEMPTED").read_text()
    subprocess.run(_cmd(model, span_data, out, 20, "--save_steps", "0"), cwd=REPO, env=train_env(), check=True)
    _assert_equal(full, out)


def test_two_processes_stop_together_and_resume_exactly(tmp_path, model, span_data):
    """The STOP file is seen by the main process only; the per-step all-reduce stops both at the same step."""
    def launch(out):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", *_cmd(model, span_data, out, 16, "--save_steps", "0",
                                                  "--global_batch_size", "6")[1:]]

    full = tmp_path / "full"
    subprocess.run(launch(full), cwd=REPO, env=train_env(), check=True)
    out = tmp_path / "stopped"
    proc = subprocess.Popen(launch(out), cwd=REPO, env=train_env())
    _wait_for_logged_steps(proc, out, 3, timeout=180)
    (out / "STOP").write_text("")
    assert proc.wait(timeout=180) != 0  # torchrun reports the workers' exit code 75 as a failure
    assert (out / "PREEMPTED").is_file() and len(list(out.glob("checkpoint-*"))) == 1
    subprocess.run(launch(out), cwd=REPO, env=train_env(), check=True)
    _assert_equal(full, out)
