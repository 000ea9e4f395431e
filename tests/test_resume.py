"""Resume: a run interrupted (crash, SIGTERM, STOP file) resumes exactly; what a checkpoint records is checked; pruning."""

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_same_export, exported_weights, free_port, make_tiny_bert, train_args, train_env, \
    wait_for_logged_lines

pytestmark = pytest.mark.slow


def _cmd(model, data, out, steps, *extra):
    return [sys.executable, "coco_accel/train.py", *train_args(
        model, data, out, *extra, per_device_train_batch_size=6, max_steps=steps, logging_steps=1, late_mlm=True,
        learning_rate="1e-3", warmup_ratio="0.3", weight_decay="0.01")]


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
    assert_same_export(full, crashed)
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
    wait_for_logged_lines(proc, out, 3, timeout=120)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    stopped = [p.name for p in out.glob("checkpoint-*")]
    assert len(stopped) == 1 and (out / "PREEMPTED").is_file()
    assert int(stopped[0].split("-")[1]) < 30, "the signal arrived after the run ended; nothing was tested"
    subprocess.run(_cmd(model, span_data, out, 30, "--save_steps", "0"), cwd=REPO, env=train_env(), check=True)
    assert not (out / "PREEMPTED").exists()
    assert_same_export(full, out)


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
    assert_same_export(tmp_path / "w0", tmp_path / "w2")


def test_stop_file_writes_a_checkpoint_and_resumes_exactly(tmp_path, model, span_data):
    """What slurm/train.sbatch does on SIGUSR1: a STOP file in the output folder."""
    full = tmp_path / "full"
    subprocess.run(_cmd(model, span_data, full, 20, "--save_steps", "0"), cwd=REPO, env=train_env(), check=True)
    out = tmp_path / "stopped"
    out.mkdir()
    (out / "STOP").write_text("")  # stale from an earlier job: removed at start, not obeyed
    proc = subprocess.Popen(_cmd(model, span_data, out, 20, "--save_steps", "0"), cwd=REPO, env=train_env())
    wait_for_logged_lines(proc, out, 3, timeout=120)
    (out / "STOP").write_text("")
    assert proc.wait(timeout=120) == 75
    assert "STOP file" in (out / "PREEMPTED").read_text()
    subprocess.run(_cmd(model, span_data, out, 20, "--save_steps", "0"), cwd=REPO, env=train_env(), check=True)
    assert_same_export(full, out)


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
    wait_for_logged_lines(proc, out, 3, timeout=180)
    (out / "STOP").write_text("")
    assert proc.wait(timeout=180) != 0  # torchrun reports the workers' exit code 75 as a failure
    assert (out / "PREEMPTED").is_file() and len(list(out.glob("checkpoint-*"))) == 1
    subprocess.run(launch(out), cwd=REPO, env=train_env(), check=True)
    assert_same_export(full, out)


def _checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


def test_save_total_limit_keeps_exactly_the_newest(tmp_path, model, span_data):
    """Five saves, a limit of two: the three oldest are deleted, each only once a newer one is complete."""
    out = tmp_path / "limited"
    subprocess.run(_cmd(model, span_data, out, 6, "--save_steps", "1", "--save_total_limit", "2"), cwd=REPO,
                   env=train_env(), check=True)
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-5"]
    assert not list(out.glob(".checkpoint-*"))


@pytest.fixture(scope="module")
def model64(tmp_path_factory, tokenizer):
    import torch

    return make_tiny_bert(tmp_path_factory.mktemp("resume_model64"), tokenizer, layers=2, dtype=torch.float64)


def _launch(nproc: int, args: list[str]) -> list[str]:
    from conftest import torchrun

    return (torchrun(nproc) + args[1:]) if nproc > 1 else args


def test_resume_on_another_process_count_continues_the_same_run(tmp_path, model64, span_data):
    """DDP: a run checkpointed by 2 processes, resumed on 1 and on 3 with the same global batch, follows the
    uninterrupted run's data stream, optimizer state and schedule (fp64, dropout 0: equal to summation-order
    noise; with dropout the per-process random streams restart, so that part is not bitwise)."""
    def cmd(out, *extra):
        return _cmd(model64, span_data, out, 6, "--global_batch_size", "6", "--save_steps", "3", *extra)

    full = tmp_path / "full"
    subprocess.run(_launch(2, cmd(full)), cwd=REPO, env=train_env(), check=True)
    for nproc in (1, 3):
        out = tmp_path / f"resumed_on_{nproc}"
        out.mkdir()
        shutil.copytree(full / "checkpoint-3", out / "checkpoint-3")
        run = subprocess.run(_launch(nproc, cmd(out)), cwd=REPO, env=train_env(), capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "written by 2 processes, on %d" % nproc in run.stderr and "Resumed from" in run.stderr
        wa, wb = exported_weights(full), exported_weights(out)
        worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert worst < 1e-9, f"resumed on {nproc}: largest weight difference {worst:.2e}"


def test_resume_refuses_other_data_or_tokenizer_unless_told(tmp_path, model, span_data, tokenizer):
    """A checkpoint records the data and tokenizer it was made from: resuming on others is refused, naming
    both and the override flag; with the flag it continues."""
    import json as _json

    out = tmp_path / "run"
    subprocess.run(_cmd(model, span_data, out, 4, "--save_steps", "2"), cwd=REPO, env=train_env(), check=True)
    (out / "model.safetensors").unlink()
    shutil.rmtree(out / "checkpoint-4", ignore_errors=True)
    state = _json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["engine"] == "ddp" and state["data"]["documents"] == 117
    assert state["tokenizer"]["vocab_sha256"] and state["recipe"]["learning_rate"] == 1e-3

    other = tmp_path / "other_data"  # the reference's tokenized format: another dataset
    other.mkdir()
    with open(other / "spans.json", "w") as fh:
        for d in range(30):
            fh.write(_json.dumps({"spans": [[1000 + d, 2000, 2001], [3000 + d, 3001]]}) + "\n")
    run = subprocess.run(_cmd(model, other, out, 4), cwd=REPO, env=train_env(), capture_output=True, text=True)
    assert run.returncode == 2 and "--resume_allow_changed_data" in run.stderr and "30 documents" in run.stderr
    assert "Traceback" not in run.stderr

    swapped = tmp_path / "other_tokenizer"  # same size, two tokens swapped: another vocabulary
    shutil.copytree(model, swapped)
    definition = _json.loads((swapped / "tokenizer.json").read_text())
    vocab = definition["model"]["vocab"]
    (a, ia), (b, ib) = [(t, i) for t, i in vocab.items() if i in (2000, 2001)]
    vocab[a], vocab[b] = ib, ia
    (swapped / "tokenizer.json").write_text(_json.dumps(definition))
    run = subprocess.run(_cmd(str(swapped), span_data, out, 4), cwd=REPO, env=train_env(), capture_output=True,
                         text=True)  # the data's own record of its tokenizer refuses it first
    assert run.returncode == 2 and "was tokenized with" in run.stderr
    unrecorded = tmp_path / "same_data_no_stats"  # the same dataset without preprocessing's record
    shutil.copytree(span_data, unrecorded)
    (unrecorded / "stats.json").unlink()
    run = subprocess.run(_cmd(str(swapped), unrecorded, out, 4), cwd=REPO, env=train_env(), capture_output=True,
                         text=True)  # the checkpoint's record of the tokenizer refuses it
    assert run.returncode == 2 and "another vocabulary" in run.stderr and "--resume_allow_changed_data" in run.stderr

    run = subprocess.run(_cmd(model, other, out, 4, "--resume_allow_changed_data"), cwd=REPO, env=train_env(),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Resuming" in run.stderr and "on other data" in run.stderr


def test_deepspeed_resume_on_another_process_count_is_refused_until_converted(tmp_path, tokenizer, span_data):
    """ZeRO partitions the optimizer state by process: a checkpoint of 2 processes is refused on 1, before
    DeepSpeed loads anything, naming the conversion; a DDP run will not take it either. Converted to
    DeepSpeed's universal format (`python -m coco_accel.checkpoint universal`), it resumes on 1 process and
    ends where the uninterrupted 2-process run does."""
    model = make_tiny_bert(tmp_path / "model", tokenizer, layers=2, dropout=0.0)

    def deepspeed(nproc, out):
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                "accelerate_configs/cpu_deepspeed_zero2.yaml", "--num_processes", str(nproc), "--main_process_port",
                str(free_port()), *_cmd(model, span_data, out, 4, "--global_batch_size", "6", "--save_steps", "2")[1:]]

    full = tmp_path / "zero2"
    env = train_env(ACCELERATE_USE_CPU="false")
    subprocess.run(deepspeed(2, full), cwd=REPO, env=env, check=True)
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(full / "checkpoint-2", out / "checkpoint-2")
    run = subprocess.run(deepspeed(1, out), cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "written by 2 processes under deepspeed-zero2" in run.stderr
    # the launcher prints its own traceback for a child's non-zero exit; none passes through our code
    assert "python -m coco_accel.checkpoint universal" in run.stderr
    assert not re.search(r'File ".*coco_accel/', run.stderr)
    run = subprocess.run(_cmd(model, span_data, out, 4, "--global_batch_size", "6"), cwd=REPO, env=train_env(),
                         capture_output=True, text=True)
    assert run.returncode == 2 and "under deepspeed-zero2; this run uses ddp" in run.stderr

    subprocess.run([sys.executable, "-m", "coco_accel.checkpoint", "universal", str(out / "checkpoint-2")], cwd=REPO,
                   env=train_env(), check=True, capture_output=True)
    run = subprocess.run(deepspeed(1, out), cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Resumed from" in run.stderr and "written by 2 processes, on 1" in run.stderr
    # Compared by what the weights compute: the loss parts and gradient norm of the steps after the resume
    # (sums over the batch, to 1e-5 in fp32). Weights after AdamW are the wrong instrument here: elements
    # whose gradient is zero but for rounding (the key biases) move by up to lr whatever their noise says.
    from conftest import metrics

    after = {r["step"]: r for r in metrics(full)}
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == [3, 4]
    for r in resumed:
        for key in ("mlm_head", "mlm_backbone", "contrastive", "grad_norm"):
            assert r[key] == pytest.approx(after[r["step"]][key], rel=1e-5), (r["step"], key)
