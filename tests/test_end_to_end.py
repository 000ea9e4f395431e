"""The real entry points, end to end: preprocess CLI -> accelerate launch train.py -> AutoModel reloads the export."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, metrics, offline_env, run_main

pytestmark = pytest.mark.slow


def test_preprocess_train_export(tmp_path, small_corpus, tiny_bert, minilm_path):
    from transformers import AutoModel, AutoTokenizer

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
    # Step 1, before any update: the MLM head's logits are near zero (tied embeddings of std 0.02 against
    # unit-variance features of 32 dimensions: std 0.11), so each masked token's cross-entropy is
    # ln(vocabulary) + 0.11**2 / 2 = 10.33, averaged over ~100 masked tokens (standard error ~0.01).
    # A loss summed instead of averaged, or taken over unmasked positions too, is far from it.
    vocab = AutoTokenizer.from_pretrained(tiny_bert).vocab_size
    for key in ("mlm_head", "mlm_backbone"):
        assert records[0][key] == pytest.approx(math.log(vocab) + 0.11 ** 2 / 2, abs=0.05), key
    assert all(math.isfinite(r[key]) for r in records for key in ("loss", "contrastive", "contrastive_acc", "lr"))
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()

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
    assert all(math.isfinite(r["heldout/docs/contrastive"]) for r in held)
    assert held[0]["heldout/docs/contrastive"] != held[-1]["heldout/docs/contrastive"]  # measured on the trained model
    refused = run_main("train", "--output_dir", tmp_path / "x", "--model_name_or_path", tiny_bert, "--train_dir",
                       data / "train", "--eval_steps", "2", "--skip_from", "2")
    assert refused.returncode == 2 and "--eval_steps" in refused.stderr


def test_bf16_autocast_trains_on_cpu(tmp_path, tiny_bert, span_data):
    """--bf16 on a CPU: Accelerate's CPU autocast around the forward and, through the step's `compute`
    context, the losses. Step 1 (same weights, same batch) equals an fp32 run's to bf16's rounding: the
    MLM parts are ~10.3, dominated by ln(vocabulary), and bf16's relative rounding of 2^-9 in the ~0.1
    logits moves them by ~1e-4; 1e-2 relative bounds that with room."""
    flags = ["--output_dir", None, "--model_name_or_path", tiny_bert, "--train_dir", str(span_data),
             "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1", "--save_steps", "0",
             "--skip_from", "2", "--late_mlm", "--report_to", "none", "--peak_tflops", "0.5"]
    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml",
           "coco_accel/train.py", *[str(bf16) if f is None else f for f in flags], "--bf16"]
    subprocess.run(cmd, check=True, env=offline_env(), cwd=REPO)
    assert run_main("train", *[str(fp32) if f is None else f for f in flags]).returncode == 0
    low, full = (metrics(out) for out in (bf16, fp32))
    assert [r["step"] for r in low] == [1, 2]
    assert json.loads((bf16 / "train_config.json").read_text())["compute"]["bf16"] is True
    for key in ("mlm_head", "mlm_backbone"):
        assert low[0][key] == pytest.approx(full[0][key], rel=1e-2) and low[0][key] != full[0][key], key
    assert all(math.isfinite(r["loss"]) and r["model_tflops_per_s"] > 0 and "mfu" in r for r in low)
