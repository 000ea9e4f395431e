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


def test_collator_benchmark_compares_like_with_like(minilm_path):
    """Both collators mask whole words up to a budget of 15%: the reference's (HF's rule) of a span's tokens
    with [CLS] and [SEP] counted, ours of the span's own tokens, i.e. (1 - 2/length) of it. The fractions are
    means over ~14,000 tokens whose per-span spread (~0.03) leaves each a standard error of ~0.0013: 0.006 is
    over three of their difference's, and a budget on other tokens (padding: x5) misses it by far."""
    result = _last_json(["benchmarks/collator_throughput.py", "--docs", "256", "--batch_docs", "64"])
    assert result["spans"] == 512
    ours, ref = result["ours_masked_fraction"], result["reference_masked_fraction"]
    assert ours == pytest.approx(ref * (1 - 2 / result["ours_tokens_per_span"]), abs=0.006)
    assert 0.14 < ref <= 0.15


def test_preprocess_benchmark_compares_like_with_like(minilm_path):
    """Both algorithms keep the same documents but for the random 10% breaks: a document whose sentences fit
    in one span is kept only when a break falls between them (probability 0.1, drawn independently by each),
    so the kept counts differ like two binomials of at most `docs` trials: standard deviation at most
    sqrt(2 * docs * 0.09), three of which bound the difference. Ours keeps the same on 1 and 2 processes."""
    import math

    result = _last_json(["benchmarks/preprocess_throughput.py", "--repeat", "2", "--mix", "--unicode"])
    assert result["mixed"] and result["unicode"]
    assert result["ours_docs_kept"] == result["ours_1proc_docs_kept"]
    assert abs(result["ours_docs_kept"] - result["reference_docs_kept"]) <= 3 * math.sqrt(2 * result["docs"] * 0.09)
    assert result["ours_docs_kept"] > 0.8 * result["docs"]


def test_data_scale_benchmark_runs_and_cleans_up(minilm_path, tmp_path):
    result = _last_json(["benchmarks/data_scale.py", "--docs", "2000,8000", "--batches", "3", "--global_docs", "256",
                         "--world", "8", "--resume_step", "5000", "--work_dir", str(tmp_path)])
    assert result["docs"] == [2000, 8000]
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
    definitions) and coco_accel.evaluation.retrieval give the same per-query numbers. Their vectors differ by float32
    rounding (other padding per batch, ~1e-5 on MiniLM's dot products of ~50), which could swap two documents
    scored that close: at most one query is allowed to differ, and the means by no more than its share. A
    random tiny BERT would not do: its CLS vectors are all alike and its scores tie to 1e-6 everywhere."""
    pytest.importorskip("sentence_transformers", reason="needs sentence-transformers (make install)")
    from conftest import write_docstring_beir

    data = write_docstring_beir(tmp_path / "docstrings")
    ours = tmp_path / "ours.json"
    subprocess.run([sys.executable, "-m", "coco_accel.evaluation", "--model", minilm_path, "--data", str(data),
                    "--output", str(ours)], cwd=REPO, check=True, capture_output=True, timeout=600)
    rows = _last_json(["benchmarks/independent_eval.py", "--data", str(data), "--pair", minilm_path, str(ours)])
    n = json.loads(ours.read_text())["datasets"]["docstrings"]["queries"]
    assert n > 10 and [r["metric"] for r in rows] == ["ndcg@10", "recall@100", "mrr@10"]
    for row in rows:
        assert row["queries_differing"] <= 1 and abs(row["ours"] - row["independent"]) <= 1 / n + 1e-12, row


@pytest.mark.parametrize("name,kind", [
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<...>)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false>>", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel__5x_cublas",
     "matmul"),
    ("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8", "matmul"),
    ("aten::addmm", "matmul"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "layer norm"),
])
def test_step_profile_sorts_kernels_by_what_they_compute(name, kind, monkeypatch):
    """Attention kernels built from CUTLASS templates, and cuDNN's, are attention, not matmul or "other"."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from step_profile import kind_of

    assert kind_of(name) == kind


def test_gpu_scripts_dry_run_end_to_end(tmp_path, minilm_path):
    """benchmarks/gpu_prepare.sh and gpu_checks.sh with DRY_RUN=1: the same path as on a GPU machine (every
    part, the trainer through accelerate launch), on the CPU with a tiny BERT. The device run leaves at most
    4 files, and its JSON line names what a result must name. The step benchmark runs every kind of row it
    has and both styles compute the same loss; the profile accounts for the whole step."""
    import tarfile

    env = {**__import__("os").environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    subprocess.run(["bash", "benchmarks/gpu_prepare.sh", str(tmp_path / "prep")], cwd=REPO, env=env, check=True,
                   timeout=300, capture_output=True)
    assert (tmp_path / "prep" / "commit.txt").read_text().strip()
    done = subprocess.run(["bash", "benchmarks/gpu_checks.sh", str(tmp_path / "prep"), str(tmp_path / "out")],
                          cwd=REPO, env=env, timeout=600, capture_output=True, text=True)
    log = (tmp_path / "out" / "gpu_checks.log").read_text()
    assert done.returncode == 0, log[-4000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_checks.log", "results.tar.gz",
                                                                    "step_throughput.json"]
    assert "requirements: all met" in log and "attention kernels: " in log
    for name in ("gpu_tests", "step_throughput", "train_plain", "train_cached", "step_profile"):
        assert f"== {name}: exit 0" in log
    assert log.count("trainer train_") == 2 and "of the benchmark's" in log
    result = json.loads((tmp_path / "out" / "step_throughput.json").read_text())
    for field in ("gpu", "driver", "torch", "transformers", "commit", "rows", "speedup", "speedup_same_batch",
                  "ours_best_mfu", "cache_over_plain_step_time"):
        assert field in result
    assert result["commit"] == (tmp_path / "prep" / "commit.txt").read_text().strip()
    styles = [(r["style"], r["docs"], r["layout"]) for r in result["rows"]]
    assert styles == [("reference", 2, None), ("ours", 2, "pack128"), ("ours", 16, "pack128"),
                      ("ours + gradient cache (8 spans/chunk)", 16, "pack128"),
                      ("ours, separate Q/K/V projections", 16, "pack128"), ("ours", 2, "bucket-1"),
                      ("ours", 16, "bucket-1")]
    assert result["loss_check"]["abs_diff"] < 1e-3 * result["loss_check"]["reference_loss"]  # fp32, ~10 terms
    # the reference computes logits at every padded position, ours at masked ones: more FLOPs per real token
    ref, ours = result["rows"][0], result["rows"][1]
    assert ref["executed_tflop"] / ref["real_tok_s"] > ours["executed_tflop"] / ours["real_tok_s"] > 0
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert "results/train_plain.metrics.jsonl" in tar.getnames()
        profile_out = tar.extractfile("results/step_profile.txt").read().decode()
    profiles = json.loads(profile_out.strip().splitlines()[-1])["profiles"]
    assert len(profiles) == 2  # the reference style's and ours
    for profile in profiles.values():
        assert profile["kinds_ms"]["matmul"] > 0 and 0 < profile["busy_ms"] <= profile["wall_ms"]
        assert sum(profile["kinds_ms"].values()) == pytest.approx(profile["busy_ms"])
        assert profile["matmul_tflop"] > 0
