"""User mistakes: each is a clear error naming the input and the fix, exit code 2, no traceback, before any step.

The commands' `main` runs in this process: a refusal at start-up needs no process of its own (an exception
other than the refusal would fail the test as a traceback would). tests/test_end_to_end.py runs a refusal
through `coco_accel/train.py` as a file, and the cases below that need several processes launch them."""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, train_env

pytestmark = pytest.mark.slow


@pytest.fixture
def _train(command):
    return lambda *args: command("train", "--max_steps", "1", "--report_to", "none", "--skip_from", "2", *args)


@pytest.fixture
def _module(command):
    return command


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


def test_model_folder_mistakes(tmp_path, span_data, tiny_bert, _train):
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


def test_sequence_length_beyond_the_positions(tmp_path, span_data, tiny_bert, _train):
    _refused(_train("--output_dir", str(tmp_path / "o"), "--model_name_or_path", tiny_bert, "--train_dir",
                    str(span_data), "--max_seq_length", "4096"), "--max_seq_length 4096", "128 positions")


def test_output_dir_that_is_a_file(tmp_path, span_data, tiny_bert, _train):
    target = tmp_path / "file"
    target.write_text("mine")
    _refused(_train("--output_dir", str(target), "--model_name_or_path", tiny_bert, "--train_dir", str(span_data)),
             "--output_dir", "is a file")


def test_a_document_of_one_span_is_found_at_load(tmp_path, reference_format, tiny_bert, _train):
    _refused(_train("--output_dir", str(tmp_path / "o"), "--model_name_or_path", tiny_bert, "--train_dir",
                    str(reference_format)), "part.json, document on line 2", "at least two")
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_data_of_another_tokenizer(tmp_path, span_data, tiny_bert, tokenizer, _train):
    """Preprocessing records its tokenizer's vocabulary hash; a model with another vocabulary is refused."""
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(span_data), str(data)], check=True)
    stats = json.loads((data / "stats.json").read_text())
    assert stats["tokenizer_vocab_sha256"] and stats["tokenizer_vocab_size"] == len(tokenizer)
    stats["tokenizer_vocab_sha256"] = "0" * 64
    (data / "stats.json").write_text(json.dumps(stats))
    _refused(_train("--output_dir", str(tmp_path / "o"), "--model_name_or_path", tiny_bert, "--train_dir", str(data)),
             "was tokenized with", "Re-run `python -m coco_accel.preprocess --tokenizer")


def test_token_ids_beyond_the_vocabulary_name_the_document(tmp_path, tiny_bert, _train):
    folder = tmp_path / "ref"
    folder.mkdir()
    with open(folder / "part.json", "w") as fh:
        for d in range(8):
            fh.write(json.dumps({"spans": [[1000, 99999 if d == 3 else 2000], [3000, 3001]]}) + "\n")
    _refused(_train("--output_dir", str(tmp_path / "o"), "--model_name_or_path", tiny_bert, "--train_dir", str(folder),
                    "--per_device_train_batch_size", "8"), "document #3", "token id 99999", "another tokenizer")
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # found at start-up, not when the batch is drawn


def test_fewer_documents_than_processes_names_the_cause(tmp_path, tiny_bert):
    from conftest import forked_run, forked_torchrun

    folder = tmp_path / "ref"
    folder.mkdir()
    (folder / "part.json").write_text(json.dumps({"spans": [[1000, 2000], [3000, 3001]]}) + "\n")
    run = forked_run(forked_torchrun(2) + ["coco_accel/train.py", "--output_dir", str(tmp_path / "o"),
                                           "--model_name_or_path", tiny_bert, "--train_dir", str(folder), "--max_steps",
                                           "1", "--skip_from", "2", "--report_to", "none"], check=False, timeout=300)
    assert run.returncode != 0
    assert "holds 1 documents, fewer than the 2 processes" in run.stderr and "--dataloader_drop_last" not in run.stderr


def test_preprocess_with_a_missing_tokenizer(tmp_path, small_corpus, _module):
    _refused(_module("preprocess", small_corpus, "--tokenizer", tmp_path / "missing", "--output_dir", tmp_path / "out"),
             "--tokenizer", "no such folder")


def test_a_mistake_seen_by_one_process_stops_every_process(tmp_path, span_data, tiny_bert):
    """Two nodes whose relative --train_dir resolves differently (node-local data missing on node 1): both
    exit at start-up with node 1's message, instead of node 0 waiting in a collective until the timeout."""
    from conftest import free_port, torchrun

    port = free_port()
    nodes = []
    for node in range(2):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        if node == 0:
            (cwd / "data").symlink_to(span_data)
        nodes.append(subprocess.Popen(
            torchrun(1, nnodes=2, node_rank=node, port=port)
            + [str(REPO / "coco_accel" / "train.py"), "--output_dir", str(tmp_path / "out"), "--model_name_or_path",
               tiny_bert, "--train_dir", "data", "--max_steps", "1", "--skip_from", "2", "--report_to", "none",
               "--ddp_timeout", "600"], cwd=cwd, env=train_env(), stderr=subprocess.PIPE, text=True))
    # node 0 can only print node 1's message if it was told, not if it waited out --ddp_timeout (600 s),
    # which the guard below would end first
    errors = [p.communicate(timeout=300)[1] for p in nodes]
    assert all(p.returncode != 0 for p in nodes)
    assert "--train_dir data: no such folder" in errors[1], errors[1][-2000:]
    assert "process 1 of 2" in errors[0] and "--train_dir data: no such folder" in errors[0], errors[0][-2000:]
    for text in errors:  # torchrun's agent reports a failed worker with a traceback of its own; ours print none
        assert text.count("Traceback") == text.count("ChildFailedError:"), text[-3000:]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_tokenizer_larger_than_the_embeddings(tmp_path, span_data, tokenizer, _train):
    from transformers import BertConfig, BertForMaskedLM

    small = tmp_path / "small_vocab"
    BertForMaskedLM(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=128)).save_pretrained(small)
    tokenizer.save_pretrained(small)
    _refused(_train("--output_dir", str(tmp_path / "o"), "--model_name_or_path", str(small), "--train_dir",
                    str(span_data)), f"its tokenizer has {len(tokenizer)} tokens", "only 1000", "resize_token_embeddings")


def test_train_dir_that_is_a_file_or_a_raw_corpus(tmp_path, tiny_bert, small_corpus, _train):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _refused(_train("--output_dir", str(tmp_path / "a"), "--model_name_or_path", tiny_bert, "--train_dir", str(afile)),
             "--train_dir", "a file, not a folder")
    _refused(_train("--output_dir", str(tmp_path / "b"), "--model_name_or_path", tiny_bert, "--train_dir",
                    str(small_corpus)), "holds a raw corpus (corpus.jsonl)", "python -m coco_accel.preprocess")


def test_preprocess_argument_mistakes(tmp_path, small_corpus, tokenizer_path, _module):
    afile = tmp_path / "afile"
    afile.write_text("x")
    common = ["--tokenizer", tokenizer_path]
    _refused(_module("preprocess", *common, "--output_dir", str(afile), str(small_corpus)), "--output_dir", "is a file")
    _refused(_module("preprocess", *common, "--output_dir", str(tmp_path / "o"), "--corpora", str(tmp_path / "no.yaml")),
             "--corpora", "no such file")
    _refused(_module("preprocess", *common, "--output_dir", str(tmp_path / "o"), "--num_shards", "0", str(small_corpus)),
             "--num_shards must be at least 1")
    _refused(_module("preprocess", *common, "--output_dir", str(tmp_path / "o"), "--eval_fraction", "1", str(small_corpus)),
             "--eval_fraction must be in [0, 1)")
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_preprocess_that_keeps_nothing_is_an_error_naming_the_record(tmp_path, tokenizer_path, _module):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "x", "text": \n')
    _refused(_module("preprocess", "--tokenizer", tokenizer_path, "--output_dir", str(tmp_path / "o"), str(bad)),
             "nothing to train on", "stats.json", "rejects.jsonl")
    assert "malformed" in (tmp_path / "o" / "rejects.jsonl").read_text()


def test_report_input_mistakes(tmp_path, caplog):
    from coco_accel.report import main as report

    run = tmp_path / "run"
    run.mkdir()
    record = {"step": 1, "loss": 1.0, "mlm_head": 0.4, "mlm_backbone": 0.4, "contrastive": 0.2, "contrastive_acc": 0.5}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n{bad\n")
    (tmp_path / "list.json").write_text("[1]")
    cases = [([str(tmp_path / "afile")], "no such folder"),
             ([str(run)], "metrics.jsonl:2: malformed JSON"),
             ([str(run), "--before", str(tmp_path / "none.json")], "--before"),
             ([str(run), "--after", str(tmp_path / "list.json")], "not a `coco_accel.evaluation` result")]
    for n, (args, words) in enumerate(cases):
        if n == 2:
            (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        caplog.clear()
        assert report(args) == 2, args
        assert words in caplog.text, (args, caplog.text)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    caplog.clear()
    assert report([str(run)]) == 2 and "neither a training record" in caplog.text
    assert not (run / "report.md").exists()


def test_demo_input_mistakes(tmp_path, _module):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _refused(_module("demo", "--output_dir", str(afile)), "--output_dir", "is a file")
    _refused(_module("demo", "--output_dir", str(tmp_path / "d"), "--eval_data", str(tmp_path / "nodata")),
             "--eval_data", "no such folder")
    assert not (tmp_path / "d").exists()  # nothing trained or written


def test_damaged_corpus_files_are_errors_naming_them(tmp_path, tokenizer_path, small_corpus, _module):
    """A .gz that is not gzip, a gzip stream cut short, a JSON-lines file cut inside its last record: each an
    error naming the file (and the line), nothing left behind: no output folder, no partial raw cache."""
    import gzip
    import shutil

    text = (small_corpus / "corpus.jsonl").read_bytes()
    plain = tmp_path / "plain" / "corpus.jsonl.gz"
    plain.parent.mkdir()
    plain.write_bytes(text)
    cut_gzip = tmp_path / "cut_gzip" / "corpus.jsonl.gz"
    cut_gzip.parent.mkdir()
    packed = gzip.compress(text)
    cut_gzip.write_bytes(packed[: len(packed) // 2])
    cut_lines = tmp_path / "cut_lines" / "corpus.jsonl"
    cut_lines.parent.mkdir()
    lines = text.splitlines(keepends=True)
    cut_lines.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    cases = [(plain, [str(plain), "not gzip-compressed"]),
             (cut_gzip, [str(cut_gzip), "cannot be read to its end", "damaged"]),
             (cut_lines, [f"{cut_lines}, line {len(lines)}", "ends inside a JSON record", "cut short"])]
    for path, words in cases:
        out, cache = tmp_path / f"out_{path.parent.name}", tmp_path / f"cache_{path.parent.name}"
        _refused(_module("preprocess", "--tokenizer", tokenizer_path, "--output_dir", out, "--cache_dir", cache,
                         path.parent), *words)
        assert not out.exists()
        raw = cache / "coco_accel_raw"
        assert not raw.exists() or not list(raw.iterdir()), list(raw.iterdir())
    # the same file whole, and a last line whole but without its newline, are read
    shutil.copy(small_corpus / "corpus.jsonl", cut_lines)
    cut_lines.write_bytes(text.rstrip(b"\n"))
    assert _module("preprocess", "--tokenizer", tokenizer_path, "--output_dir", tmp_path / "whole", "--cache_dir",
                   tmp_path / "cache_whole", cut_lines.parent).returncode == 0


def test_a_damaged_arrow_shard_is_named(tmp_path, span_data, tiny_bert, _train):
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(span_data), str(data)], check=True)
    (shard,) = data.glob("*.arrow")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _refused(_train("--output_dir", str(tmp_path / "o"), "--model_name_or_path", tiny_bert, "--train_dir", str(data)),
             f"the shard {shard} is damaged", "coco_accel.preprocess")


def test_a_zero_launch_without_deepspeed_installed_names_the_extra(monkeypatch):
    """DeepSpeed is an extra: a launch config that asks for it, where it is not installed, is refused
    before the process group forms, naming the extra and the DDP alternative."""
    import importlib.util

    from coco_accel.training.config import ConfigError, TrainConfig
    from coco_accel.training.engine import build_accelerator

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = TrainConfig.from_flags(output_dir="o", model_name_or_path="m", train_dir="t")
    with pytest.raises(ConfigError, match=r"pip install 'coco-accel\[deepspeed\]'.*DDP config"):
        build_accelerator(cfg)
