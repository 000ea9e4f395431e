"""User mistakes: each is a clear error naming the input and the fix, exit code 2, no traceback, before any step."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, train_env

pytestmark = pytest.mark.slow


def _train(*args):
    return subprocess.run([sys.executable, "coco_accel/train.py", "--max_steps", "1", "--report_to", "none",
                           "--skip_from", "2", *args], cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=300)


def _refused(run, *words):
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    for word in words:
        assert word in run.stderr, (word, run.stderr[-2000:])


@pytest.fixture
def reference_format(tmp_path):
    """A folder in the reference's tokenized format whose second document has one span."""
    folder = tmp_path / "ref"
    folder.mkdir()
    (folder / "part.json").write_text(json.dumps({"spans": [[1000, 2000], [3000]]}) + "\n"
                                      + json.dumps({"spans": [[1000, 1001]]}) + "\n")
    return folder


def test_model_folder_mistakes(tmp_path, span_data, tiny_bert):
    _refused(_train("--output_dir", str(tmp_path / "a"), "--model_name_or_path", str(tmp_path / "missing"),
                    "--train_dir", str(span_data)), "--model_name_or_path", "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(_train("--output_dir", str(tmp_path / "b"), "--model_name_or_path", str(empty), "--train_dir",
                    str(span_data)), "no config.json")
    untokenized = tmp_path / "no_tokenizer"
    untokenized.mkdir()
    for name in ("config.json", "model.safetensors"):
        (untokenized / name).write_bytes((Path(tiny_bert) / name).read_bytes())
    _refused(_train("--output_dir", str(tmp_path / "c"), "--model_name_or_path", str(untokenized), "--train_dir",
                    str(span_data)), "holds no tokenizer files", "tokenizer.save_pretrained")


def test_sequence_length_beyond_the_positions(tmp_path, span_data, tiny_bert):
    _refused(_train("--output_dir", str(tmp_path / "o"), "--model_name_or_path", tiny_bert, "--train_dir",
                    str(span_data), "--max_seq_length", "4096"), "--max_seq_length 4096", "128 positions")


def test_output_dir_that_is_a_file(tmp_path, span_data, tiny_bert):
    target = tmp_path / "file"
    target.write_text("mine")
    _refused(_train("--output_dir", str(target), "--model_name_or_path", tiny_bert, "--train_dir", str(span_data)),
             "--output_dir", "is a file")


def test_a_document_of_one_span_is_found_at_load(tmp_path, reference_format, tiny_bert):
    _refused(_train("--output_dir", str(tmp_path / "o"), "--model_name_or_path", tiny_bert, "--train_dir",
                    str(reference_format)), "part.json, document on line 2", "at least two")
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_data_of_another_tokenizer(tmp_path, span_data, tiny_bert, tokenizer):
    """Preprocessing records its tokenizer's vocabulary hash; a model with another vocabulary is refused."""
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(span_data), str(data)], check=True)
    stats = json.loads((data / "stats.json").read_text())
    assert stats["tokenizer_vocab_sha256"] and stats["tokenizer_vocab_size"] == len(tokenizer)
    stats["tokenizer_vocab_sha256"] = "0" * 64
    (data / "stats.json").write_text(json.dumps(stats))
    _refused(_train("--output_dir", str(tmp_path / "o"), "--model_name_or_path", tiny_bert, "--train_dir", str(data)),
             "was tokenized with", "Re-run `python -m coco_accel.preprocess --tokenizer")


def test_token_ids_beyond_the_vocabulary_name_the_document(tmp_path, tiny_bert):
    folder = tmp_path / "ref"
    folder.mkdir()
    with open(folder / "part.json", "w") as fh:
        for d in range(8):
            fh.write(json.dumps({"spans": [[1000, 99999 if d == 3 else 2000], [3000, 3001]]}) + "\n")
    _refused(_train("--output_dir", str(tmp_path / "o"), "--model_name_or_path", tiny_bert, "--train_dir", str(folder),
                    "--per_device_train_batch_size", "8"), "document #3", "token id 99999", "another tokenizer")


def test_fewer_documents_than_processes_names_the_cause(tmp_path, tiny_bert):
    from conftest import torchrun

    folder = tmp_path / "ref"
    folder.mkdir()
    (folder / "part.json").write_text(json.dumps({"spans": [[1000, 2000], [3000, 3001]]}) + "\n")
    run = subprocess.run(torchrun(2) + ["coco_accel/train.py", "--output_dir", str(tmp_path / "o"),
                                        "--model_name_or_path", tiny_bert, "--train_dir", str(folder), "--max_steps",
                                        "1", "--skip_from", "2", "--report_to", "none"],
                         cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "holds 1 documents, fewer than the 2 processes" in run.stderr and "--dataloader_drop_last" not in run.stderr


def test_preprocess_with_a_missing_tokenizer(tmp_path, small_corpus):
    run = subprocess.run([sys.executable, "-m", "coco_accel.preprocess", str(small_corpus), "--tokenizer",
                          str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")], cwd=REPO,
                         env=train_env(), capture_output=True, text=True, timeout=300)
    _refused(run, "--tokenizer", "no such folder")
