"""The benchmark scripts run and end with their JSON line (smoke test on tiny sizes; speed is not asserted here)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def _last_json(args):
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_collator_benchmark_runs(minilm_path):
    result = _last_json(["benchmarks/collator_throughput.py", "--docs", "256", "--batch_docs", "64"])
    assert result["spans"] == 512 and result["speedup"] > 0


def test_step_benchmark_runs_every_row_kind(minilm_path):
    result = _last_json(["benchmarks/step_throughput.py", "--ref_docs", "2", "--our_docs", "2,4", "--steps", "1",
                         "--cache_row", "--cache_chunk", "4", "--unfused_row", "--layouts=pack64,bucket-1"])
    styles = [(r["style"], r["layout"]) for r in result["rows"]]
    assert styles == [("reference", None), ("ours", "pack64"), ("ours", "pack64"),
                      ("ours + gradient cache (4 spans/chunk)", "pack64"), ("ours, separate Q/K/V projections", "pack64"),
                      ("ours", "bucket-1"), ("ours", "bucket-1")]
    assert result["speedup"] > 0 and "cache_over_plain_step_time" in result and result["fused_qkv_speedup"] > 0
    assert result["loss_check"]["abs_diff"] < 1e-3  # both styles compute the same loss


def test_preprocess_benchmark_runs(minilm_path):
    result = _last_json(["benchmarks/preprocess_throughput.py", "--repeat", "2", "--mix", "--unicode"])
    assert result["docs"] > 0 and result["mixed"] and result["unicode"] and result["speedup"] > 0


def test_step_profile_runs_and_accounts_the_time(minilm_path):
    result = _last_json(["benchmarks/step_profile.py", "--docs", "4"])
    (profile,) = result["profiles"].values()
    assert profile["kinds_ms"]["matmul"] > 0 and 0 < profile["busy_ms"] <= profile["wall_ms"]
    assert sum(profile["kinds_ms"].values()) == pytest.approx(profile["busy_ms"])
    assert profile["matmul_tflop"] > 0 and profile["matmul_tflops_per_s"] > 0


def test_data_scale_benchmark_runs_and_cleans_up(minilm_path, tmp_path):
    result = _last_json(["benchmarks/data_scale.py", "--docs", "3000,30000", "--batches", "3", "--global_docs", "256",
                         "--world", "8", "--resume_step", "5000", "--work_dir", str(tmp_path)])
    assert result["docs"] == [3000, 30000]
    for key in ("batch_ms", "batch_ms_64", "worker_rss_mib", "mapped_file_mib", "startup_s", "resume_s"):
        assert len(result[key]) == 2 and all(v > 0 for v in result[key])
    assert list(tmp_path.iterdir()) == []  # every dataset it wrote is gone


def _man_page(folder, name, summary, description):
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    roff = f".TH {name.upper()} 1\n.SH NAME\n{name} \\- {summary}\n.SH DESCRIPTION\n{description}\n"
    (folder / f"{name}.1.gz").write_bytes(gzip.compress(roff.encode()))


def test_manpage_collection_is_a_beir_folder_of_known_items(tmp_path):
    """Each kept page is one document and its summary one query judged relevant to it alone; a pre-release
    copy, a shared summary, a short summary or a short description are left out."""
    import shutil

    if shutil.which("groff") is None:
        pytest.skip("needs groff to render manual pages")
    long = "word " * 25
    man = tmp_path / "man" / "man1"
    _man_page(man, "lister", "list directory contents", "Lister lists the files of a folder. " + long)
    _man_page(man, "copier", "copy files and directories", "Copier copies what it is given. " + long)
    _man_page(man, "pre", "copy a preview of files", "(BETA) Pre copies files. " + long)
    _man_page(man, "twin1", "same summary for two", "One of two. " + long)
    _man_page(man, "twin2", "same summary for two", "The other of two. " + long)
    _man_page(man, "terse", "too short", "Short summary. " + long)
    _man_page(man, "brief", "a short description here", "Only a few words.")
    out = tmp_path / "beir"
    result = _last_json(["benchmarks/manpage_collection.py", "--man_root", str(tmp_path / "man"), "--output", str(out),
                         "--docs", "10", "--queries", "10"])
    assert result["documents"] == 2 and result["queries"] == 2 and result["summaries_shared_and_skipped"] == 1
    corpus = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert sorted(d["_id"] for d in corpus) == ["copier.1", "lister.1"]
    assert {d["title"] for d in corpus} == {"copier", "lister"} and all(d["text"].endswith("word") for d in corpus)
    queries = {q["_id"]: q["text"] for q in map(json.loads, (out / "queries.jsonl").read_text().splitlines())}
    qrels = [line.split("\t") for line in (out / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    judged = {queries[q]: doc for q, doc, score in qrels}
    assert judged == {"list directory contents": "lister.1", "copy files and directories": "copier.1"}


def test_the_independent_evaluator_agrees_with_ours(tmp_path, minilm_path):
    """benchmarks/independent_eval.py (its own reading, sentence-transformers vectors, metrics from their
    definitions) and coco_accel.evaluate give the same per-query numbers. Their vectors differ by float32
    rounding (other padding per batch, ~1e-5 on MiniLM's dot products of ~50), which could swap two documents
    scored that close: at most one query is allowed to differ, and the means by no more than its share. A
    random tiny BERT would not do: its CLS vectors are all alike and its scores tie to 1e-6 everywhere."""
    pytest.importorskip("sentence_transformers", reason="needs sentence-transformers (make install)")
    from conftest import write_docstring_beir

    data = write_docstring_beir(tmp_path / "docstrings")
    ours = tmp_path / "ours.json"
    subprocess.run([sys.executable, "-m", "coco_accel.evaluate", "--model", minilm_path, "--data", str(data),
                    "--output", str(ours)], cwd=REPO, check=True, capture_output=True, timeout=600)
    rows = _last_json(["benchmarks/independent_eval.py", "--data", str(data), "--pair", minilm_path, str(ours)])
    n = json.loads(ours.read_text())["datasets"]["docstrings"]["queries"]
    assert n > 10 and [r["metric"] for r in rows] == ["ndcg@10", "recall@100", "mrr@10"]
    for row in rows:
        assert row["queries_differing"] <= 1 and abs(row["ours"] - row["independent"]) <= 1 / n + 1e-12, row
