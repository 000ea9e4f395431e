"""The real entry points, end to end: preprocess CLI -> accelerate launch train.py -> AutoModel reloads the export."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def test_preprocess_train_export(tmp_path, small_corpus, tiny_bert, minilm_path):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "coco_accel.preprocess", "--tokenizer", minilm_path, "--output_dir",
                    str(data), "--cache_dir", str(tmp_path / "cache"), str(small_corpus)],
                   check=True, env=_env(), cwd=REPO)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml",
           "coco_accel/train.py", "--output_dir", str(out), "--model_name_or_path", tiny_bert, "--train_dir",
           str(data), "--per_device_train_batch_size", "4", "--max_steps", "6", "--logging_steps", "2",
           "--save_steps", "3", "--skip_from", "2", "--late_mlm", "--learning_rate", "1e-3", "--warmup_ratio", "0.2"]
    subprocess.run(cmd, check=True, env=_env(), cwd=REPO)

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
                           "1"], capture_output=True, text=True, env=_env(), cwd=REPO)
    assert proc.returncode == 2
    assert "Did you mean --learning_rate" in proc.stderr
    assert "Traceback" not in proc.stderr
