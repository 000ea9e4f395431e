"""GPU-only paths: fp16 dynamic loss scaling, bf16, NCCL. Skipped without CUDA (run them on a GPU machine:
`.venv/bin/python -m pytest -q -m gpu tests/test_gpu.py`)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, offline_env, record_cls, span_batch, train_args

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _run(cmd, out):
    subprocess.run(cmd, cwd=REPO, env=offline_env(), check=True, timeout=900)
    return [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]


def _flags(out, model, data, *extra):
    return ["coco_accel/train.py", *train_args(model, data, out, *extra, per_device_train_batch_size=8, max_steps=6,
                                                logging_steps=2, save_steps=0, late_mlm=True, report_to="none")]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, tiny_bert, span_data):
    """The same run in fp32 on the GPU: what the mixed-precision runs are compared with."""
    out = tmp_path_factory.mktemp("gpu") / "fp32"
    return _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 "accelerate_configs/single_gpu.yaml", "--mixed_precision", "no", *_flags(out, tiny_bert, span_data)],
                out)


# Step 1 (same weights, same batch) in 16 bits against fp32: the MLM parts are ~10.3 (ln of the 30,522-token
# vocabulary; the tiny model's logits are ~0.1) and the rounding of the 16-bit logits (2^-9 relative in bf16,
# 2^-11 in fp16) moves them by ~1e-4; the contrastive part is computed in fp32 from 16-bit CLS vectors of
# norm ~6, whose dot products move by ~36 x 2^-9 = 0.07 in bf16 at most, and its loss by no more.
STEP1_TOL = {"bf16": {"mlm_head": 1e-2, "mlm_backbone": 1e-2, "contrastive": 0.1},
             "fp16": {"mlm_head": 2.5e-3, "mlm_backbone": 2.5e-3, "contrastive": 0.025}}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_single_gpu_mixed_precision(tmp_path, tiny_bert, span_data, fp32_run, precision):
    out = tmp_path / precision
    records = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    "accelerate_configs/single_gpu.yaml", "--mixed_precision", precision,
                    *_flags(out, tiny_bert, span_data)], out)
    assert [r["step"] for r in records] == [r["step"] for r in fp32_run]
    for key, tol in STEP1_TOL[precision].items():
        assert abs(records[0][key] - fp32_run[0][key]) <= tol * max(1.0, abs(fp32_run[0][key])), key
    assert records[0]["mlm_head"] != fp32_run[0]["mlm_head"]  # the 16-bit path ran
    if precision == "fp16":  # the loss scale is logged with its overflow count (steps the scaler skipped)
        assert all(r["loss_scale"] > 0 and isinstance(r["overflow_steps"], int) for r in records)
        assert records[-1]["overflow_steps"] <= 6


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_nccl_two_gpus_equal_one(tmp_path, tiny_bert, span_data):
    """fp32, so that tests/test_distributed.py's derivation holds: the logged loss parts and gradient norm are
    sums of positive terms added in another order, equal to 1e-5."""
    one = _run([sys.executable, *_flags(tmp_path / "one", tiny_bert, span_data)], tmp_path / "one")
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                *_flags(tmp_path / "two", tiny_bert, span_data, "--global_batch_size", "8")], tmp_path / "two")
    assert [a["step"] for a in one] == [b["step"] for b in two]
    for a, b in zip(one, two):
        for key in ("mlm_head", "mlm_backbone", "contrastive", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


@pytest.mark.parametrize("chunk", [0, 4])
def test_step_planned_from_the_host_never_waits_for_the_device(chunk):
    """The forward and the losses of a packed step, planned from the host batch, queue their work without
    one synchronising call (CUDA's sync debug mode turns any into an error), so the host prepares the
    next step while the device still runs this one. Backward is left out: embedding backward syncs."""
    from transformers import BertConfig, BertForMaskedLM

    from coco_accel.model.condenser import Condenser
    from coco_accel.model.packing import host_layout
    from coco_accel.training.step import StepSettings, cached_step, plain_step

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64)
    model = Condenser(BertForMaskedLM(cfg), n_head_layers=2, skip_from=2, late_mlm=True, pack_length=24).cuda()
    ids, mask, labels = span_batch([20, 3, 7, 12, 5, 20, 9, 4])
    host = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    batch = {k: v.cuda() for k, v in host.items()}
    losses = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if chunk:  # its first pass needs no backward; the replay's backward is the no-op below
                parts = cached_step(model, batch, lambda loss, last: losses.append(loss), StepSettings(),
                                    chunk_size=chunk, layout=host_layout(host["attention_mask"], host["labels"]))
            else:
                parts = plain_step(model, batch, lambda loss, last: losses.append(loss), StepSettings(), layout=host_layout(host["attention_mask"], host["labels"]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert losses and math.isfinite(float(parts.loss))


def _first_and_replayed_cls(model, lengths, chunk: int, monkeypatch, width: int = 20, vocab: int = 120) -> list:
    """The CLS vectors of a bf16 gradient-cached step's first pass and of its replay, chunk by chunk."""
    from coco_accel.model.packing import host_layout
    from coco_accel.training.step import StepSettings, cached_step

    ids, mask, labels = span_batch(lengths, width=width, vocab=vocab, label_rate=0.15 if width > 20 else 0.4)
    host = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    batch = {k: v.cuda() for k, v in host.items()}
    seen = record_cls(monkeypatch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cached_step(model, batch, lambda loss, last: loss.backward(), StepSettings(), chunk_size=chunk, layout=host_layout(host["attention_mask"], host["labels"]))
    chunks = len(seen) // 2
    assert len(seen) == 2 * chunks and chunks == -(-len(lengths) // chunk)
    return seen[:chunks], seen[chunks:]


@pytest.mark.parametrize("compiled", [False, True])
def test_gradient_cache_replays_the_first_pass_dropout_on_the_gpu(compiled, monkeypatch):
    """As on the CPU (tests/test_losses.py): with dropout (SDPA's fused dropout included) and bf16, each
    chunk's replay computes bit for bit the CLS vectors of its first pass; compiled too (Triton's dropout)."""
    from transformers import BertConfig, BertForMaskedLM

    from coco_accel.model.condenser import Condenser

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    model = Condenser(BertForMaskedLM(cfg), n_head_layers=2, skip_from=2, late_mlm=True, pack_length=24).cuda().train()
    if compiled:
        model.compile_parts()
    first, replay = _first_and_replayed_cls(model, [20, 3, 7, 12, 5, 20, 9, 4], 3, monkeypatch)
    for a, b in zip(first, replay):
        assert torch.equal(a, b)


def test_gradient_cache_replays_the_first_pass_dropout_at_bert_base_size(monkeypatch):
    """BERT-base (dropout 0.1, SDPA's fused dropout in the packed attention) in bf16 on the GPU: each chunk's
    replay computes bit for bit the CLS vectors of its first pass, over 4 chunks of 64 spans of the
    reference's lengths."""
    from transformers import BertConfig, BertForMaskedLM

    from coco_accel.model.condenser import Condenser

    torch.manual_seed(0)
    model = Condenser(BertForMaskedLM(BertConfig()), n_head_layers=2, skip_from=6, late_mlm=True,
                      pack_length=128).cuda().train()
    lengths = torch.randint(10, 33, (256,))
    lengths[::10] = torch.randint(33, 128, lengths[::10].shape)
    first, replay = _first_and_replayed_cls(model, lengths.tolist(), 64, monkeypatch, width=128, vocab=30000)
    for a, b in zip(first, replay):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])  # different spans, different vectors


def test_partial_last_layer_is_as_exact_as_the_full_layer_in_bf16_at_bert_base_size():
    """At BERT-base size in bf16 on the GPU, the last layer computed only at the wanted slots (CLS and masked
    ones) is as close to the fp64 layer as the full bf16 layer is: it is the same computation in smaller
    matmuls, so its error may differ from the full layer's by rounding order only (bound: twice the full
    layer's own worst error). Negative control: the wanted slots shifted by one are off by far more."""
    import copy

    import numpy as np
    from transformers import BertConfig, BertForMaskedLM

    from coco_accel.model.families.bert import layer_at
    from coco_accel.model.packing import query_layout

    torch.manual_seed(0)
    layer64 = BertForMaskedLM(BertConfig(attn_implementation="sdpa")).bert.encoder.layer[0].double().cuda().eval()
    layer16 = copy.deepcopy(layer64).to(torch.bfloat16)
    rows, capacity = 64, 128
    rng = np.random.default_rng(0)
    segment = np.full((rows, capacity), -1)
    starts, n = [], 0
    for r in range(rows):  # spans of the reference's lengths (8-30 tokens, a tenth up to 126) packed into rows
        at = 0
        while True:
            length = int(rng.integers(31, 127) if rng.random() < 0.1 else rng.integers(8, 31)) + 2
            if at + length > capacity:
                break
            segment[r, at:at + length] = n
            starts.append(r * capacity + at)
            at, n = at + length, n + 1
    masked = np.flatnonzero((segment.reshape(-1) >= 0) & (rng.random(rows * capacity) < 0.15))
    want = np.unique(np.concatenate([starts, masked]))
    segment = torch.from_numpy(segment).cuda()
    hidden64 = torch.randn(rows, capacity, 768, dtype=torch.float64, device="cuda")

    def partial(layer, hidden, slots):
        queries, take, q = query_layout(slots, rows, capacity)
        queries, take, slots_t = (torch.from_numpy(x).cuda() for x in (queries, take, slots))
        mask = segment.reshape(-1)[queries].view(rows, 1, q, 1) == segment[:, None, None, :]
        return layer_at(layer, hidden, mask, queries, take, slots_t)

    same = segment[:, None, :, None] == segment[:, None, None, :]
    at = torch.from_numpy(want).cuda()
    wanted = lambda out: (out[0] if isinstance(out, tuple) else out).reshape(rows * capacity, -1)[at]  # noqa: E731
    with torch.no_grad():
        truth = wanted(layer64(hidden64, same))
        full = wanted(layer16(hidden64.bfloat16(), same))
        part = partial(layer16, hidden64.bfloat16(), want)
        shifted = partial(layer16, hidden64.bfloat16(), np.minimum(want + 1, rows * capacity - 1))
    err_full = (full.double() - truth).abs().max().item()
    err_part = (part.double() - truth).abs().max().item()
    assert 0 < err_full < 0.25 and err_part <= 2 * err_full, (err_full, err_part)
    assert (shifted.double() - truth).abs().max().item() > 10 * err_full
