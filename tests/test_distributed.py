"""Parity, the heart of correctness: N processes (DDP or DeepSpeed), several nodes, gradient cache == one process.

Every run goes through the real entry point (`coco_accel/train.py` under torchrun or accelerate launch)
with a tiny BERT (dropout 0) for two optimizer steps, then the exported weights are compared. The
exactness runs use an fp64 model, so that any real discrepancy (a wrong offset, a missing gradient
path, a world-size factor) stands out at 1e-9 instead of hiding in fp32 summation-order noise,
which Adam amplifies for parameters whose gradient is near zero; the fp32 runs check the tolerance
users see (FP32_TOL). Each run asserts the process count it actually got (train.py refuses a group
of the wrong size).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_tiny_bert

pytestmark = pytest.mark.slow

GLOBAL_DOCS = 12
# fp32 runs: two Adam steps at lr 1e-4 move an element by up to 2e-4; an element whose true gradient is
# ~0 (the [CLS] embedding row) moves by whatever its summation-order noise says, seen up to 1.3e-5 on
# one element in a million. A real fault (a wrong offset or scale) moves everything by ~1e-4.
FP32_TOL = 3e-5


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    env.update(extra)
    return env


def _flags(model: str, data: Path, out: Path, per_device: int, *extra: str) -> list[str]:
    return ["--output_dir", str(out), "--model_name_or_path", model, "--train_dir", str(data),
            "--per_device_train_batch_size", str(per_device), "--max_steps", "2", "--logging_steps", "1",
            "--save_steps", "0", "--skip_from", "2", "--late_mlm", "--learning_rate", "1e-4",
            "--max_grad_norm", "1.0", "--weight_decay", "0.01", *extra]


def _torchrun(nproc: int, args: list[str], nnodes: int = 1) -> None:
    port = _port()
    base = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
            "--master_addr=127.0.0.1", f"--master_port={port}"]
    procs = [subprocess.Popen(base + [f"--node_rank={node}", "coco_accel/train.py", *args], cwd=REPO, env=_env())
             for node in range(nnodes)]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0] * nnodes


def _single(args: list[str]) -> None:
    subprocess.run([sys.executable, "coco_accel/train.py", *args], cwd=REPO, env=_env(), check=True, timeout=600)


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    state.update(load_file(str(out / "condenser_head.safetensors")))
    return state


def _assert_same(a: Path, b: Path, tol: float = 1e-9) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    assert worst < tol, f"largest weight difference {worst:.2e}"


def _setup(root: Path, tokenizer, span_data, dtype):
    model = make_tiny_bert(root / "model", tokenizer, layers=3, hidden=32, dropout=0.0, dtype=dtype)
    ref = root / "one"
    _single(_flags(model, span_data, ref, GLOBAL_DOCS))
    from safetensors.torch import load_file

    initial = load_file(str(Path(model) / "model.safetensors"))
    trained = _weights(ref)
    assert trained["bert.embeddings.word_embeddings.weight"].dtype == dtype
    moved = max((trained[k] - initial[k]).abs().max().item() for k in initial if k in trained)
    assert moved > 1e-4, "two steps at lr 1e-4 must move the weights, or equality proves nothing"
    return model, span_data, root, ref


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer, span_data):
    return _setup(tmp_path_factory.mktemp("parity64"), tokenizer, span_data, torch.float64)


@pytest.fixture(scope="module")
def setup32(tmp_path_factory, tokenizer, span_data):
    return _setup(tmp_path_factory.mktemp("parity32"), tokenizer, span_data, torch.float32)


def test_fp32_two_processes_within_tolerance(setup32):
    model, data, root, ref = setup32
    out = root / "ddp2"
    _torchrun(2, _flags(model, data, out, GLOBAL_DOCS // 2))
    _assert_same(ref, out, tol=FP32_TOL)


def _deepspeed(nproc: int, args: list[str], stage: int = 2) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           f"accelerate_configs/cpu_deepspeed_zero{stage}.yaml", "--num_processes", str(nproc),
           "--main_process_port", str(_port()), "coco_accel/train.py", *args]
    subprocess.run(cmd, cwd=REPO, env=_env(ACCELERATE_USE_CPU="false"), check=True, timeout=600)


@pytest.mark.parametrize("cache", [False, True])
def test_deepspeed_zero2_equals_ddp(setup32, cache):
    """ZeRO-2 (2 processes, gloo) against DDP and one process, fp32. DeepSpeed computes its own
    gradient norm for clipping (it differs from torch's in the 4th digit here); Adam's update hardly
    depends on that scale, so weights agree to fp32 noise."""
    model, data, root, ref = setup32
    extra = ("--cache_chunk_size", "4") if cache else ()
    out = root / f"zero2{'_cache' if cache else ''}"
    _deepspeed(2, _flags(model, data, out, GLOBAL_DOCS // 2, *extra))
    _assert_same(ref, out, tol=FP32_TOL)
    if (root / "ddp2").exists():
        _assert_same(root / "ddp2", out, tol=FP32_TOL)


def test_length_groups_instead_of_packing_equal_one(setup):
    """--pack_length 0 (length groups, merged by call cost) on 2 processes == packed rows on one."""
    model, data, root, ref = setup
    out = root / "ddp2_groups"
    _torchrun(2, _flags(model, data, out, GLOBAL_DOCS // 2, "--pack_length", "0", "--length_bucket_call_cost", "16"))
    _assert_same(ref, out)


def test_two_and_three_processes_equal_one(setup):
    model, data, root, ref = setup
    for nproc in (2, 3):
        out = root / f"ddp{nproc}"
        _torchrun(nproc, _flags(model, data, out, GLOBAL_DOCS // nproc))
        _assert_same(ref, out)
    import json

    one = [json.loads(line) for line in open(ref / "metrics.jsonl")]
    three = [json.loads(line) for line in open(root / "ddp3" / "metrics.jsonl")]
    for r1, r3 in zip(one, three):  # logged losses are the true global means
        assert r1["loss"] == pytest.approx(r3["loss"], rel=1e-5)
        assert r1["contrastive_acc"] == pytest.approx(r3["contrastive_acc"])


def test_short_last_batch_split_unevenly(setup, tokenizer, span_data):
    """117 documents in global batches of 12: step 10 holds 9 documents, split 4 + 5 over 2 processes."""
    model, data, root, _ = setup
    ref, out = root / "one_epoch", root / "one_epoch_ddp2"
    _single(_flags(model, data, ref, GLOBAL_DOCS, "--max_steps", "10"))
    _torchrun(2, _flags(model, data, out, GLOBAL_DOCS // 2, "--max_steps", "10"))
    _assert_same(ref, out)


def test_gradient_cache_equals_full_batch(setup):
    model, data, root, ref = setup
    out = root / "cache1"
    _single(_flags(model, data, out, GLOBAL_DOCS, "--cache_chunk_size", "5"))
    _assert_same(ref, out)
    out2 = root / "cache2"
    _torchrun(2, _flags(model, data, out2, GLOBAL_DOCS // 2, "--cache_chunk_size", "4"))
    _assert_same(ref, out2)


def test_two_nodes_of_two_processes_equal_one(setup):
    """Local rank != global rank on the second node: the reference got this wrong."""
    model, data, root, ref = setup
    out = root / "nodes"
    _torchrun(2, _flags(model, data, out, GLOBAL_DOCS // 4), nnodes=2)
    _assert_same(ref, out)


def test_deepspeed_zero3_trains_and_exports_gathered_weights(setup32):
    """ZeRO-3 shards the parameters; the export gathers them (same names, same values as one process)."""
    model, data, root, ref = setup32
    out = root / "zero3"
    _deepspeed(2, _flags(model, data, out, GLOBAL_DOCS // 2), stage=3)
    _assert_same(ref, out, tol=FP32_TOL)


def test_deepspeed_zero3_refuses_the_gradient_cache(tmp_path, tiny_bert, span_data):
    """ZeRO-3 gathers each module's parameters at every call, so the cache's re-encoding would gather them
    once per chunk: refused before any step, with the reason and what to use instead."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           "accelerate_configs/cpu_deepspeed_zero3.yaml", "--num_processes", "1", "--main_process_port", str(_port()),
           "coco_accel/train.py", *_flags(tiny_bert, span_data, tmp_path / "out", 4, "--cache_chunk_size", "4")]
    run = subprocess.run(cmd, cwd=REPO, env=_env(ACCELERATE_USE_CPU="false"), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode != 0
    assert "--cache_chunk_size with ZeRO-3 is not supported" in run.stderr and "Use ZeRO-1/2" in run.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
