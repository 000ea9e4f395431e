"""Parity, the heart of correctness: N processes (DDP or DeepSpeed), several nodes, gradient cache == one process.

Every run goes through the real entry point (`coco_accel/train.py`): several nodes under real torchrun
agents; one node with its ranks forked by tests/helpers/forked_ranks.py, in the environment torchrun or
accelerate launch (its own code, from the config file) gives them. With a tiny BERT (dropout 0) and
`--optimizer sgd`: plain gradient descent, so each run's weight updates ARE its gradients times the
learning rate. A wrong scale (a world-size or chunk-count factor) or a lost gradient path changes them in
proportion; AdamW would normalise a uniform scale away and inflate summation-order noise on near-zero
gradients into updates of ~lr. Each comparison checks the per-tensor updates, the logged gradient norm
(before clipping) and the loss parts of every step.

The exactness runs use an fp64 model (differences at 1e-9 are real faults); the fp32 runs check the
tolerance users see, derived below. Each run asserts the process count it got (train.py refuses a group
of the wrong size). Every run is 5 steps, the 5th being the epoch's short batch (21 documents, split
unevenly over 2 processes, asserted), so each comparison also covers the uneven last batch. Single-process
runs (the references) call the trainer in the test process.
"""

import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, exported_weights, forked_run, forked_torchrun, free_port, make_tiny_bert, make_tiny_modernbert, \
    make_tiny_roberta, metrics, run_main, torchrun, train_args, train_env

pytestmark = pytest.mark.slow

GLOBAL_DOCS = 24  # divisible by 1, 2, 3, 4, 6 and 8 processes
DOCS = 117  # the test corpus's documents: epochs of 4 full global batches and a short one of 21
STEPS = 5  # the 5th is the short batch
LR = 0.5  # SGD: updates of ~1e-2 (much larger than the rounding of the weights they are added to)

# Tolerance of an fp32 run against another process count, engine or chunking, relative to each tensor's
# largest update. Each gradient element is a sum over the batch's ~1,300 tokens (48 spans of ~27) of
# products through 3 layers, added in another order by each layout: fp32's worst case for such a sum is
# n * u = 1300 * 6e-8 = 8e-5 of the sum of magnitudes (typically sqrt(n) * u = 2e-6), and each of the 5
# steps adds its error to the update: 5 * 8e-5 = 4e-4, bounded by 5e-4. The faults this must catch are
# >= 1/24 of a tensor's update (one process's rows lost from 24 documents, a factor of 2 or of a chunk
# count), 80 times more.
FP32_REL = 5e-4
FP64_REL = 1e-9  # the same sums in fp64: u = 1.1e-16, 1300 * u = 1.5e-13, with margin
# A gradient that is zero in exact arithmetic (the key bias: softmax ignores a shift shared by all keys) is
# left with the rounding of its cancelling terms, n * u of their magnitudes, which are those of the model's
# other gradients: every tensor is allowed that much of the model's largest update besides its own share.
TERMS = 1300
# Logged gradient norm and loss parts: sums of positive terms (squares, per-token losses) in float32/64,
# whose relative error is at most n * u over their ~1e6 / 1,300 terms, far under these.
LOGGED_REL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _flags(model: str, data: Path, out: Path, per_device: int, *extra: str) -> list[str]:
    return train_args(model, data, out, *extra, per_device_train_batch_size=per_device, max_steps=STEPS,
                      logging_steps=1, save_steps=0, late_mlm=True, optimizer="sgd", learning_rate=LR,
                      max_grad_norm="1e9", weight_decay=0, report_to="none")


def _torchrun(nproc: int, args: list[str], nnodes: int = 1) -> None:
    """Several nodes: real torchrun agents, one a node. One node: torchrun's ranks forked."""
    if nnodes == 1:
        forked_run(forked_torchrun(nproc) + ["coco_accel/train.py", *args])
        return
    port = free_port()
    procs = [subprocess.Popen(torchrun(nproc, nnodes, node, port) + ["coco_accel/train.py", *args], cwd=REPO,
                              env=train_env()) for node in range(nnodes)]
    assert [p.wait(timeout=600) for p in procs] == [0] * nnodes


def _single(args: list[str]) -> None:
    run = run_main("train", *args)
    assert run.returncode == 0, run.stderr[-3000:]


def _deepspeed(nproc: int, args: list[str], out: Path, stage: int = 2) -> None:
    extensions = out.with_name(out.name + ".torch_extensions")
    forked_run(["accelerate", "--config_file", f"accelerate_configs/cpu_deepspeed_zero{stage}.yaml", "--num_processes",
                str(nproc), "--main_process_port", str(free_port()), "coco_accel/train.py", *args],
               env=train_env(ACCELERATE_USE_CPU="false", TORCH_EXTENSIONS_DIR=str(extensions)))
    # DeepSpeed's shared-memory all-reduce (inference only) is not compiled at start-up: a minute of C++
    assert not extensions.exists() or not list(extensions.rglob("*shm*"))


class Parity:
    """A reference run (one process) and the weights it started from, to compare other runs with."""

    def __init__(self, root: Path, model: str, data: Path, dtype: torch.dtype):
        self.root, self.model, self.data, self.dtype = root, model, data, dtype
        self.rel = FP64_REL if dtype == torch.float64 else FP32_REL
        start = root / "start"  # lr 0: the export holds the initial weights, the randomly initialised head included
        _single(_flags(model, data, start, GLOBAL_DOCS, "--max_steps", "1", "--learning_rate", "0"))
        self.initial = exported_weights(start)
        self.ref = self.run("one", 1)

    def out(self, name: str) -> Path:
        return self.root / name

    def run(self, name: str, nproc: int, *extra: str, launcher: str = "torchrun", nnodes: int = 1,
            stage: int = 2) -> Path:
        out = self.out(name)
        args = _flags(self.model, self.data, out, GLOBAL_DOCS // (nproc * nnodes), *extra)
        if launcher == "deepspeed":
            _deepspeed(nproc, args, out, stage)
        elif nproc * nnodes == 1:
            _single(args)
        else:
            _torchrun(nproc, args, nnodes)
        return out

    def assert_same(self, out: Path, ref: Path = None, summed_in: torch.dtype = None) -> float:
        """Per-tensor updates, logged gradient norms and loss parts of `out` against the reference run's.
        Returns the worst update difference relative to its tensor's largest update. summed_in: the dtype
        `out`'s gradients were summed in when not the weights' own (DeepSpeed reduces fp64 in fp32)."""
        ref = ref or self.ref
        summed_in = summed_in or self.dtype
        rel_updates = FP32_REL if summed_in == torch.float32 else self.rel
        wr, wo = exported_weights(ref), exported_weights(out)
        assert wr.keys() == wo.keys() == self.initial.keys()
        assert all(w.dtype == self.dtype for w in wo.values())
        eps, eps_sum = torch.finfo(self.dtype).eps, torch.finfo(summed_in).eps
        updates = {k: (wr[k].double() - w0.double(), wo[k].double() - w0.double()) for k, w0 in self.initial.items()}
        largest = max(d_ref.abs().max().item() for d_ref, _ in updates.values())
        assert largest > 1e-3, "the runs must move the weights, or equal updates prove nothing"
        worst = 0.0
        for k, (d_ref, d_out) in updates.items():
            scale = d_ref.abs().max().item()
            # each step rounds the weight it updates to the model's dtype (half an ulp of |w| per step and
            # run), and a cancelling sum keeps n * u of its terms (TERMS)
            floor = 2 * STEPS * eps * self.initial[k].double().abs().max().item() + TERMS * eps_sum / 2 * largest
            err = (d_out - d_ref).abs().max().item()
            assert err <= rel_updates * scale + floor, (f"{k}: updates differ by {err:.3e}, "
                                                        f"{err / max(scale, 1e-300):.2e} of the largest ({scale:.3e})")
            worst = max(worst, (err - floor) / scale if scale > 0 else 0.0)
        rel = LOGGED_REL[summed_in]  # DeepSpeed also logs its own fp32 norm
        a, b = metrics(ref), metrics(out)
        assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
        for ra, rb in zip(a, b):
            for key in ("grad_norm", "mlm_head", "mlm_backbone", "contrastive"):
                assert rb[key] == pytest.approx(ra[key], rel=rel), f"step {ra['step']}: {key}"
            if self.dtype == torch.float64:  # an argmax: in fp32, near-ties of a tiny random model flip with the
                assert rb["contrastive_acc"] == ra["contrastive_acc"]  # summation order, so only fp64 compares it
        return worst


@pytest.fixture(scope="module")
def data(span_data):
    from coco_accel.training.batches import load_train_data

    assert len(load_train_data(str(span_data))) == DOCS
    return span_data


@pytest.fixture(scope="module")
def fp64(tmp_path_factory, tokenizer, data):
    root = tmp_path_factory.mktemp("parity64")
    return Parity(root, make_tiny_bert(root / "model", tokenizer, layers=3, dropout=0.0, dtype=torch.float64),
                  data, torch.float64)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, tokenizer, data):
    root = tmp_path_factory.mktemp("parity32")
    return Parity(root, make_tiny_bert(root / "model", tokenizer, layers=3, dropout=0.0), data, torch.float32)


@pytest.fixture(scope="module")
def modernbert64(tmp_path_factory, tokenizer, data):
    root = tmp_path_factory.mktemp("parity_modernbert")
    return Parity(root, make_tiny_modernbert(root / "model", tokenizer, dtype=torch.float64), data, torch.float64)


def test_modernbert_on_two_processes_with_ddp_the_gradient_cache_and_zero2_equals_one(modernbert64):
    """The same parity for a ModernBERT backbone (packed rows with rotary positions and sliding-window
    layers): 2 processes under DDP, 2 with the gradient cache, and 2 under DeepSpeed ZeRO-2 == 1 process."""
    modernbert64.assert_same(modernbert64.run("ddp2", 2))
    modernbert64.assert_same(modernbert64.run("ddp2_cache", 2, "--cache_chunk_size", "5"))
    # DeepSpeed sums the gradients of fp64 weights in fp32 (its reduction buffers: 8e-8 of an update where
    # DDP's fp64 sums give 1e-16), so its run is held to fp32's tolerance, still 80x below a lost process.
    modernbert64.assert_same(modernbert64.run("zero2", 2, launcher="deepspeed"), summed_in=torch.float32)


@pytest.fixture(scope="module", params=["roberta", "xlm-roberta"])
def roberta64(request, tmp_path_factory, tokenizer, data):
    root = tmp_path_factory.mktemp(f"parity_{request.param}")
    return Parity(root, make_tiny_roberta(root / "model", tokenizer, request.param, dtype=torch.float64), data,
                  torch.float64)


def test_the_roberta_family_on_two_processes_and_with_the_gradient_cache_equals_one(roberta64):
    """RoBERTa and XLM-R (positions after the padding index) through the trainer: 2 processes under DDP,
    and 2 with the gradient cache, == 1 process, in fp64."""
    roberta64.assert_same(roberta64.run("ddp2", 2))
    roberta64.assert_same(roberta64.run("ddp2_cache", 2, "--cache_chunk_size", "5"))


def test_two_and_three_processes_equal_one(fp64):
    """Also the epoch's short last batch, split 10 + 11 over 2 processes (asserted)."""
    _short_last_batch_is_uneven(2, 0)
    for nproc in (2, 3):
        fp64.assert_same(fp64.run(f"ddp{nproc}", nproc))


def test_eight_processes_equal_one(fp64):
    fp64.assert_same(fp64.run("ddp8", 8))


def test_two_nodes_of_two_processes_equal_one(fp64):
    """Local rank != global rank on the second node: the reference got this wrong."""
    fp64.assert_same(fp64.run("nodes", 2, nnodes=2))


def test_length_groups_instead_of_packing_equal_one(fp64):
    """--pack_length 0 (length groups, merged by call cost) on 2 processes == packed rows on one."""
    fp64.assert_same(fp64.run("ddp2_groups", 2, "--pack_length", "0", "--length_bucket_call_cost", "16"))


def test_gradient_cache_equals_full_batch(fp64):
    """In chunks of 5 spans on one process, of 4 on two (where the short batch's 20 and 22 spans would make 5
    and 6 chunks without equalisation, asserted)."""
    _short_last_batch_is_uneven(2, 4)
    fp64.assert_same(fp64.run("cache1", 1, "--cache_chunk_size", "5"))
    fp64.assert_same(fp64.run("cache2", 2, "--cache_chunk_size", "4"))


def _short_last_batch_is_uneven(nproc: int, chunk: int) -> None:
    """The subject of the short-last-batch checks, asserted so that it cannot silently vanish: step 5 is the
    epoch's short batch, its documents split unevenly over the processes, and with the gradient cache
    their chunk counts would differ without equalisation."""
    from coco_accel.training.batches import BatchPlan
    from coco_accel.training.step import chunk_sizes

    plan = BatchPlan(DOCS, GLOBAL_DOCS, seed=42, drop_last=False, world_size=nproc)
    assert plan.steps_per_epoch == STEPS
    _, last = plan.global_batch(STEPS - 1)
    shares = plan.shares(len(last))
    assert len(last) == DOCS % GLOBAL_DOCS and len(set(shares)) > 1, shares
    if chunk:
        rows = [2 * n for n in shares]
        assert len({-(-r // chunk) for r in rows}) > 1, "the naive chunk counts must differ"
        assert len({len(chunk_sizes(r, chunk, rows)) for r in rows}) == 1


def test_fp32_two_processes_within_tolerance(fp32):
    fp32.assert_same(fp32.run("ddp2", 2))


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("cache", [False, True])
def test_deepspeed_equals_ddp(fp32, stage, cache):
    """ZeRO-1/2 (2 processes, gloo) against one process, fp32. With the cache (chunks of at most 4 spans),
    every backward under ZeRO-2 reduces gradients, so the processes must run equal chunk counts: on the
    short batch's 20 and 22 spans naively 5 and 6, which would hang or reduce mismatched buckets."""
    extra = ("--cache_chunk_size", "4") if cache else ()
    if cache:
        _short_last_batch_is_uneven(2, 4)
    fp32.assert_same(fp32.run(f"zero{stage}{'_cache' if cache else ''}", 2, *extra, launcher="deepspeed", stage=stage))


def test_deepspeed_zero3_trains_and_exports_gathered_weights(fp32):
    """ZeRO-3 shards the parameters; the export gathers them (same names, same values as one process)."""
    fp32.assert_same(fp32.run("zero3", 2, launcher="deepspeed", stage=3))


def test_deepspeed_zero3_refuses_the_gradient_cache(tmp_path, tiny_bert, span_data):
    """ZeRO-3 gathers each module's parameters at every call, so the cache's re-encoding would gather them
    once per chunk: refused before any step, with the reason and what to use instead."""
    run = forked_run(["accelerate", "--config_file", "accelerate_configs/cpu_deepspeed_zero3.yaml", "--num_processes",
                      "1", "--main_process_port", str(free_port()), "coco_accel/train.py",
                      *_flags(tiny_bert, span_data, tmp_path / "out", 4, "--cache_chunk_size", "4")],
                     env=train_env(ACCELERATE_USE_CPU="false"), check=False)
    assert run.returncode != 0
    assert "--cache_chunk_size with ZeRO-3 is not supported" in run.stderr and "Use ZeRO-1/2" in run.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_parity_check_catches_a_wrong_scale(fp64):
    """The comparison itself: a run whose gradients are scaled by (1 + 1/24), as a lost or doubled process
    share would, fails it; Adam would have hidden this."""
    wrong = fp64.run("scaled", 1, "--learning_rate", str(LR * (1 + 1 / GLOBAL_DOCS)))
    with pytest.raises(AssertionError, match="updates differ"):
        fp64.assert_same(wrong)


@pytest.mark.parametrize("cache", [False, True])
def test_no_host_sync_in_the_step_with_two_processes(tmp_path, tiny_bert, span_data, cache):
    """With 2 processes the step (forward, gather, losses, backward, clipping) never makes the host wait for
    the device: the gather's row counts come from the batch plan. CUDA's sync debug mode is not available
    on the CPU, so the calls that would wait are counted (tests/helpers/count_host_syncs.py); the counter
    sees the size exchange that the plan replaced."""
    import json

    extra = ("--cache_chunk_size", "4") if cache else ()
    counts = tmp_path / "counts"
    counts.mkdir()
    args = _flags(tiny_bert, span_data, tmp_path / "out", 6, "--max_steps", "5", "--logging_steps", "100", *extra)
    forked_run(forked_torchrun(2) + ["tests/helpers/count_host_syncs.py", *args], env=train_env(SYNC_COUNTS_DIR=str(counts)))
    for rank in range(2):
        record = json.loads((counts / f"rank{rank}.json").read_text())
        assert record["steps"] == 5, record
        assert record["counts"] == {}, f"rank {rank}: host syncs inside the step: {record['counts']}"
        assert record["control"].get("item", 0) >= 2, record["control"]
