"""The real entry points, end to end: preprocess CLI -> accelerate launch train.py -> AutoModel reloads the export."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, offline_env

pytestmark = pytest.mark.slow


def test_preprocess_train_export(tmp_path, small_corpus, tiny_bert, minilm_path):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "coco_accel.preprocess", "--tokenizer", minilm_path, "--output_dir",
                    str(data), "--cache_dir", str(tmp_path / "cache"), str(small_corpus)],
                   check=True, env=offline_env(), cwd=REPO)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml",
           "coco_accel/train.py", "--output_dir", str(out), "--model_name_or_path", tiny_bert, "--train_dir",
           str(data), "--per_device_train_batch_size", "4", "--max_steps", "6", "--logging_steps", "2",
           "--save_steps", "3", "--skip_from", "2", "--late_mlm", "--learning_rate", "1e-3", "--warmup_ratio", "0.2"]
    subprocess.run(cmd, check=True, env=offline_env(), cwd=REPO)

    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 4, 6]
    for r in records:
        for key in ("loss", "mlm_head", "mlm_backbone", "contrastive", "contrastive_acc", "lr"):
            assert math.isfinite(r[key]), key
        assert r["loss"] == pytest.approx(r["mlm_head"] + r["mlm_backbone"] + r["contrastive"])
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()

    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    enc = tok(["a library catalogue"], return_tensors="pt")
    assert model(**enc).last_hidden_state.shape[-1] == 32
    assert (out / "condenser_head.safetensors").is_file()


def test_bad_flag_exits_with_a_message(tmp_path):
    proc = subprocess.run([sys.executable, "coco_accel/train.py", "--output_dir", str(tmp_path), "--learning_rat",
                           "1"], capture_output=True, text=True, env=offline_env(), cwd=REPO)
    assert proc.returncode == 2
    assert "Did you mean --learning_rate" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_heldout_signal_is_logged_per_corpus(tmp_path, small_corpus, tiny_bert, minilm_path):
    from coco_accel.preprocess import preprocess

    data = tmp_path / "data"
    preprocess([str(small_corpus)], minilm_path, str(data), eval_fraction=0.25, cache_dir=str(tmp_path / "c"))
    out = tmp_path / "run"
    subprocess.run([sys.executable, "coco_accel/train.py", "--output_dir", str(out), "--model_name_or_path",
                    tiny_bert, "--train_dir", str(data), "--per_device_train_batch_size", "4", "--max_steps", "4",
                    "--eval_steps", "2", "--eval_max_docs", "16", "--skip_from", "2", "--save_steps", "0",
                    "--report_to", "none"], check=True, env=offline_env(), cwd=REPO)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    held = [r for r in records if "heldout/docs/contrastive" in r]
    assert [r["step"] for r in held] == [0, 2, 4]
    for r in held:
        assert math.isfinite(r["heldout/docs/contrastive"]) and 0 <= r["heldout/docs/contrastive_acc"] <= 1
    proc = subprocess.run([sys.executable, "coco_accel/train.py", "--output_dir", str(tmp_path / "x"),
                           "--model_name_or_path", tiny_bert, "--train_dir", str(data / "train"), "--eval_steps", "2",
                           "--skip_from", "2"], env=offline_env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2


def test_bf16_autocast_trains_on_cpu(tmp_path, tiny_bert, span_data):
    """--bf16 on a CPU: Accelerate's CPU autocast around the forward and, through the step's `compute`
    context, the losses; the loss parts stay finite and add up."""
    out = tmp_path / "bf16"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml",
           "coco_accel/train.py", "--output_dir", str(out), "--model_name_or_path", tiny_bert, "--train_dir",
           str(span_data), "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1",
           "--save_steps", "0", "--skip_from", "2", "--late_mlm", "--bf16", "--report_to", "none",
           "--peak_tflops", "0.5"]
    subprocess.run(cmd, check=True, env=offline_env(), cwd=REPO)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["mlm_head"] + r["mlm_backbone"] + r["contrastive"])
        assert r["model_tflops_per_s"] > 0 and r["mfu"] == pytest.approx(r["model_tflops_per_s"] / 0.5)
