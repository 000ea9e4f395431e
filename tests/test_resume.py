"""Resume: a run interrupted (crash, SIGTERM, STOP file) resumes exactly; what a checkpoint records is checked; pruning."""

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_same_export, exported_weights, forked, forked_run, forked_torchrun, free_port, make_tiny_bert, metrics, run_main, \
    train_args, train_env, wait_for_logged_lines

pytestmark = pytest.mark.slow


def _cmd(model, data, out, steps, *extra):
    return [sys.executable, "coco_accel/train.py", *train_args(
        model, data, out, *extra, per_device_train_batch_size=6, max_steps=steps, logging_steps=1, late_mlm=True,
        learning_rate="1e-3", warmup_ratio="0.3", weight_decay="0.01")]


STEPS = 20


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    # Dropout on: resuming must also restore the random streams.
    return make_tiny_bert(tmp_path_factory.mktemp("resume_model"), tokenizer, layers=2, dropout=0.1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model, span_data) -> Path:
    """The run every interrupted one must end equal to: STEPS steps on one process, no data-loader worker, a
    checkpoint every 2 steps of which the newest 2 are kept (writing checkpoints changes no number)."""
    full = tmp_path_factory.mktemp("resume") / "full"
    run = run_main("train", *_cmd(model, span_data, full, STEPS, "--save_steps", "2", "--save_total_limit", "2")[2:])
    assert run.returncode == 0, run.stderr[-3000:]
    return full


def _checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


def test_save_total_limit_keeps_exactly_the_newest(uninterrupted):
    """Nine saves, a limit of two: the seven oldest are deleted, each only once a newer one is complete."""
    assert _checkpoints(uninterrupted) == ["checkpoint-16", "checkpoint-18"]
    assert not list(uninterrupted.glob(".checkpoint-*"))


def test_resumed_run_equals_uninterrupted(tmp_path, model, span_data, uninterrupted):
    # A crash right after checkpoint-16: only that checkpoint (and the log so far) survive.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-16", crashed / "checkpoint-16")
    shutil.copy(uninterrupted / "metrics.jsonl", crashed / "metrics.jsonl")
    (crashed / ".checkpoint-18.tmp").mkdir()  # a half-written checkpoint is never taken for the latest
    assert run_main("train", *_cmd(model, span_data, crashed, STEPS, "--save_steps", "2")[2:]).returncode == 0
    assert_same_export(uninterrupted, crashed)
    steps = [json.loads(line)["step"] for line in open(crashed / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))
    a = [json.loads(line)["loss"] for line in open(uninterrupted / "metrics.jsonl")]
    b = [json.loads(line)["loss"] for line in open(crashed / "metrics.jsonl")]
    assert a == b


def _stop_and_resume(out: Path, start, stop, steps: int = STEPS) -> str:
    """`start()` a run (a process), wait until it has logged 3 steps, `stop` it, check that it exited with
    code 75 leaving one checkpoint before the end and the PREEMPTED marker, and run the same command again
    to the end (`start().wait()`). Returns what the marker said."""
    proc = start()
    wait_for_logged_lines(proc, out, 3)
    stop(proc)
    assert proc.wait(timeout=300) == 75
    stopped = _checkpoints(out)
    assert len(stopped) == 1 and (out / "PREEMPTED").is_file()
    assert int(stopped[0].split("-")[1]) < steps, "the stop arrived after the run ended; nothing was tested"
    marker = (out / "PREEMPTED").read_text()
    assert start().wait(timeout=600) == 0
    assert not (out / "PREEMPTED").exists()
    return marker


def _process(cmd: list[str]):
    return lambda: subprocess.Popen(cmd, cwd=REPO, env=train_env())


def test_sigterm_writes_a_checkpoint_and_resumes_exactly(tmp_path, model, span_data, uninterrupted):
    out = tmp_path / "preempted"
    _stop_and_resume(out, _process(_cmd(model, span_data, out, STEPS, "--save_steps", "0")),
                     lambda proc: proc.send_signal(signal.SIGTERM))
    assert_same_export(uninterrupted, out)


def test_stop_file_and_data_loader_workers_resume_exactly(tmp_path, model, span_data, uninterrupted):
    """What slurm/train.sbatch does on SIGUSR1: a STOP file in the output folder. Run and resumed run with 2
    data-loader workers, which change nothing: the end equals the uninterrupted run without workers."""
    out = tmp_path / "stopped"
    out.mkdir()
    (out / "STOP").write_text("")  # stale from an earlier job: removed at start, not obeyed
    marker = _stop_and_resume(out, _process(_cmd(model, span_data, out, STEPS, "--save_steps", "0",
                                                 "--dataloader_num_workers", "2")),
                              lambda proc: (out / "STOP").write_text(""))
    assert "STOP file" in marker
    assert_same_export(uninterrupted, out)


def test_refuses_a_non_empty_output_dir_without_checkpoints(tmp_path, model, span_data, command):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    run = command("train", *_cmd(model, span_data, out, 2)[2:])
    assert run.returncode == 2 and "--overwrite_output_dir" in run.stderr


def test_a_fresh_start_removes_old_checkpoints_only_once_its_inputs_pass(tmp_path, model, span_data, command):
    """--resume none --overwrite_output_dir into a folder holding another run's checkpoint: a start refused
    for its inputs (a missing data folder) leaves the checkpoint; one that passes its checks removes it, so
    that a later --resume auto cannot continue the other run."""
    out = tmp_path / "reused"
    old = out / "checkpoint-7"
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text("{}")
    fresh = ("--resume", "none", "--overwrite_output_dir")
    run = command("train", *_cmd(model, tmp_path / "no_data", out, 2, *fresh)[2:])
    assert run.returncode == 2 and "--train_dir" in run.stderr and old.is_dir()
    run = command("train", *_cmd(model, span_data, out, 2, *fresh)[2:])
    assert run.returncode == 0, run.stderr[-3000:]
    assert not old.exists() and "removing 1 old checkpoints" in run.stderr


def test_two_processes_stop_together_and_resume_exactly(tmp_path, model, span_data):
    """The STOP file is seen by the main process only; the per-step all-reduce stops both at the same step
    (both exit with 75)."""
    def launch(out):
        return forked_torchrun(2) + _cmd(model, span_data, out, 16, "--save_steps", "0", "--global_batch_size", "6")[1:]

    full = tmp_path / "full"
    forked_run(launch(full))
    out = tmp_path / "stopped"
    _stop_and_resume(out, lambda: forked(launch(out)), lambda proc: (out / "STOP").write_text(""), steps=16)
    assert_same_export(full, out)


@pytest.fixture(scope="module")
def model64(tmp_path_factory, tokenizer):
    import torch

    return make_tiny_bert(tmp_path_factory.mktemp("resume_model64"), tokenizer, layers=2, dtype=torch.float64)


def test_resume_on_another_process_count_continues_the_same_run(tmp_path, model64, span_data):
    """DDP: a run checkpointed by 2 processes, resumed on 1 and on 3 with the same global batch, follows the
    uninterrupted run's data stream, optimizer state and schedule (fp64, dropout 0: equal to summation-order
    noise; with dropout the per-process random streams restart, so that part is not bitwise)."""
    def cmd(out, *extra):
        return _cmd(model64, span_data, out, 6, "--global_batch_size", "6", "--save_steps", "3", *extra)

    full = tmp_path / "full"
    forked_run(forked_torchrun(2) + cmd(full)[1:])
    for nproc in (1, 3):
        out = tmp_path / f"resumed_on_{nproc}"
        out.mkdir()
        shutil.copytree(full / "checkpoint-3", out / "checkpoint-3")
        if nproc == 1:  # in this process
            run = run_main("train", *cmd(out)[2:])
        else:
            run = forked_run(forked_torchrun(nproc) + cmd(out)[1:], check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "written by 2 processes, on %d" % nproc in run.stderr and "Resumed from" in run.stderr
        wa, wb = exported_weights(full), exported_weights(out)
        worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert worst < 1e-9, f"resumed on {nproc}: largest weight difference {worst:.2e}"


def test_resume_refuses_other_data_or_tokenizer_unless_told(tmp_path, model, span_data, uninterrupted, command):
    """A checkpoint records the data and tokenizer it was made from: resuming on others is refused, naming
    both and the override flag; with the flag it continues."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-16", out / "checkpoint-16")
    state = json.loads((out / "checkpoint-16" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["engine"] == "ddp" and state["data"]["documents"] == 117
    assert state["tokenizer"]["vocab_sha256"] and state["recipe"]["learning_rate"] == 1e-3

    def train(model_dir, data, *extra):
        return command("train", *_cmd(model_dir, data, out, STEPS, *extra)[2:])

    other = tmp_path / "other_data"  # the reference's tokenized format: another dataset
    other.mkdir()
    with open(other / "spans.json", "w") as fh:
        for d in range(30):
            fh.write(json.dumps({"spans": [[1000 + d, 2000, 2001], [3000 + d, 3001]]}) + "\n")
    run = train(model, other)
    assert run.returncode == 2 and "--resume_allow_changed_data" in run.stderr and "30 documents" in run.stderr

    swapped = tmp_path / "other_tokenizer"  # same size, two tokens swapped: another vocabulary
    shutil.copytree(model, swapped)
    definition = json.loads((swapped / "tokenizer.json").read_text())
    vocab = definition["model"]["vocab"]
    (a, ia), (b, ib) = [(t, i) for t, i in vocab.items() if i in (2000, 2001)]
    vocab[a], vocab[b] = ib, ia
    (swapped / "tokenizer.json").write_text(json.dumps(definition))
    run = train(swapped, span_data)  # the data's own record of its tokenizer refuses it first
    assert run.returncode == 2 and "was tokenized with" in run.stderr
    unrecorded = tmp_path / "same_data_no_stats"  # the same dataset without preprocessing's record
    shutil.copytree(span_data, unrecorded)
    (unrecorded / "stats.json").unlink()
    run = train(swapped, unrecorded)  # the checkpoint's record of the tokenizer refuses it
    assert run.returncode == 2 and "another vocabulary" in run.stderr and "--resume_allow_changed_data" in run.stderr

    run = train(model, other, "--resume_allow_changed_data")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Resuming" in run.stderr and "on other data" in run.stderr
    assert [r["step"] for r in metrics(out)] == list(range(17, STEPS + 1))


def test_deepspeed_resume_on_another_process_count_is_refused_until_converted(tmp_path, tokenizer, span_data, command):
    """ZeRO partitions the optimizer state by process: a checkpoint of 2 processes is refused on 1, before
    DeepSpeed loads anything, naming the conversion; a DDP run will not take it either. Converted to
    DeepSpeed's universal format (`python -m coco_accel.checkpoint universal`), it resumes on 1 process and
    ends where the uninterrupted 2-process run does. The refusal under the real `accelerate launch`; the
    runs with their ranks forked (the launcher's own code prepares their environment)."""
    model = make_tiny_bert(tmp_path / "model", tokenizer, layers=2, dropout=0.0)

    def deepspeed(nproc, out):
        return ["accelerate", "--config_file", "accelerate_configs/cpu_deepspeed_zero2.yaml", "--num_processes",
                str(nproc), "--main_process_port", str(free_port()),
                *_cmd(model, span_data, out, 4, "--global_batch_size", "6", "--save_steps", "2")[1:]]

    full = tmp_path / "zero2"
    env = train_env(ACCELERATE_USE_CPU="false")
    forked_run(deepspeed(2, full), env=env)
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(full / "checkpoint-2", out / "checkpoint-2")
    launched = [sys.executable, "-m", "accelerate.commands.launch", *deepspeed(1, out)[1:]]
    run = subprocess.run(launched, cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "written by 2 processes under deepspeed-zero2" in run.stderr
    # the launcher prints its own traceback for a child's non-zero exit; none passes through our code
    assert "python -m coco_accel.checkpoint universal" in run.stderr
    assert not re.search(r'File ".*coco_accel/', run.stderr)
    run = command("train", *_cmd(model, span_data, out, 4, "--global_batch_size", "6")[2:])
    assert run.returncode == 2 and "under deepspeed-zero2; this run uses ddp" in run.stderr

    assert command("checkpoint", "universal", out / "checkpoint-2").returncode == 0
    run = forked_run(deepspeed(1, out), env=env)
    assert "Resumed from" in run.stderr and "written by 2 processes, on 1" in run.stderr
    # Compared by what the weights compute: the loss parts and gradient norm of the steps after the resume
    # (sums over the batch, to 1e-5 in fp32). Weights after AdamW are the wrong instrument here: elements
    # whose gradient is zero but for rounding (the key biases) move by up to lr whatever their noise says.
    after = {r["step"]: r for r in metrics(full)}
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == [3, 4]
    for r in resumed:
        for key in ("mlm_head", "mlm_backbone", "contrastive", "grad_norm"):
            assert r[key] == pytest.approx(after[r["step"]][key], rel=1e-5), (r["step"], key)
