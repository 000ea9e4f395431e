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
