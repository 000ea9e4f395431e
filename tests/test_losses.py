"""The loss terms against hand-computed values."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import record_cls, span_batch
from coco_accel.model.packing import host_layout
from coco_accel.training.losses import masked_lm_loss, span_contrastive_loss

# Two documents, two spans each, rows in pairs: (a0, a1) and (b0, b1).
X = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [2.0, 0.0]])


def hand_loss_and_grad(x: np.ndarray):
    """Mean cross-entropy of each row's sibling among all other rows, and its gradient, by hand."""
    n = len(x)
    s = x @ x.T
    target = np.arange(n) ^ 1
    losses, g = [], np.zeros_like(s)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        z = sum(math.exp(s[i, j]) for j in others)
        losses.append(-s[i, target[i]] + math.log(z))
        for j in others:  # d loss_i / d s_ij = softmax - onehot
            g[i, j] = (math.exp(s[i, j]) / z - (j == target[i])) / n
    grad = (g + g.T) @ x  # s = x x^T
    return float(np.mean(losses)), grad


def test_contrastive_loss_matches_hand_computation():
    # Row a0: scores to (a1, b0, b1) = (1, 0, 2), positive a1 -> loss = -1 + log(e + 1 + e^2).
    expected, expected_grad = hand_loss_and_grad(X)
    assert expected == pytest.approx(np.mean([
        -1 + math.log(math.e + 1 + math.e ** 2),
        -1 + math.log(math.e + math.e + math.e ** 2),
        -0 + math.log(1 + math.e + 1),
        -0 + math.log(math.e ** 2 + math.e ** 2 + 1)]))
    x = torch.tensor(X, requires_grad=True)
    loss, correct = span_contrastive_loss(x, x, row_offset=0, normalizer=4)
    loss.backward()
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), expected_grad, atol=1e-6)
    # Best non-self column: a0 -> b1, a1 -> b1, b0 -> a1, b1 -> a0 (tie with a1, first wins): none is the sibling.
    assert correct.item() == 0


def test_self_is_never_a_candidate_and_siblings_can_win():
    x = torch.tensor([[5.0, 0.0], [5.0, 0.1], [0.0, 5.0], [0.1, 5.0]])
    loss, correct = span_contrastive_loss(x, x, row_offset=0, normalizer=4)
    assert correct.item() == 4
    assert loss.item() < 1e-3  # self-similarity (25) would dominate if it were not masked


def test_process_shares_add_up_to_the_global_mean():
    """Rows split over 'processes' with their offsets: the shares (normaliser N / world) average to the full loss."""
    x = torch.randn(8, 3, dtype=torch.float64)
    full, full_correct = span_contrastive_loss(x, x, row_offset=0, normalizer=8)
    world = 2
    shares = [span_contrastive_loss(x[r * 4:(r + 1) * 4], x, row_offset=r * 4, normalizer=8 / world)
              for r in range(world)]
    assert sum(s[0] for s in shares).item() / world == pytest.approx(full.item(), rel=1e-12)
    assert sum(int(s[1]) for s in shares) == int(full_correct)


def test_temperature_and_normalisation():
    x = torch.tensor(X, dtype=torch.float64)
    plain, _ = span_contrastive_loss(x, x, row_offset=0, normalizer=4)
    # (x/2)(x/2)/0.25 = x x
    hot, _ = span_contrastive_loss(x * 0.5, x * 0.5, row_offset=0, normalizer=4, temperature=0.25)
    assert hot.item() == pytest.approx(plain.item())
    cos, _ = span_contrastive_loss(x * 7.0, x, row_offset=0, normalizer=4, normalize=True)
    unit = torch.nn.functional.normalize(x, dim=-1)
    ref, _ = span_contrastive_loss(unit, unit, row_offset=0, normalizer=4)
    assert cos.item() == pytest.approx(ref.item())


def test_similarity_is_fp32_under_bf16_autocast():
    x = torch.randn(6, 16) * 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = span_contrastive_loss(x, x, row_offset=0, normalizer=6)
    ref, _ = span_contrastive_loss(x, x, row_offset=0, normalizer=6)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_masked_lm_loss_is_sum_over_normaliser():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 2])
    expected = (-2 + math.log(math.e ** 2 + 2)) + (-0 + math.log(2 + math.e))
    assert masked_lm_loss(logits, targets, 4.0).item() == pytest.approx(expected / 4)
    empty = masked_lm_loss(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, dtype=torch.long), 1.0)
    assert empty.item() == 0.0 and empty.requires_grad


@pytest.mark.parametrize("chunk_rows", [7, 1000])
def test_decoder_cross_entropy_equals_the_loss_on_full_logits(monkeypatch, chunk_rows):
    """Chunked, gradients-in-forward == cross-entropy on all the logits: loss and the gradients of the
    features, the (tied) weight and the bias, in float64; several chunks and one."""
    from coco_accel.training import losses

    monkeypatch.setattr(losses, "DECODER_CHUNK_ELEMENTS", chunk_rows * 50)
    torch.manual_seed(0)
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        decoder = torch.nn.Linear(8, 50).double()
        features = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
        targets = torch.randint(0, 50, (37,))
        if fused:
            loss = losses.decoder_cross_entropy(features, decoder, targets, 5.0)
        else:
            loss = masked_lm_loss(decoder(features), targets, 5.0)
        (loss * 3.0).backward()  # a non-unit upstream gradient
        results.append((loss.detach(), features.grad, decoder.weight.grad, decoder.bias.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_decoder_cross_entropy_under_autocast_and_its_fallbacks(half):
    from coco_accel.training.losses import decoder_cross_entropy

    torch.manual_seed(0)
    decoder = torch.nn.Linear(16, 40)
    features = torch.randn(20, 16, requires_grad=True)
    targets = torch.randint(0, 40, (20,))
    with torch.autocast("cpu", dtype=half):
        fused = decoder_cross_entropy(features, decoder, targets, 1.0)
        plain = masked_lm_loss(decoder(features), targets, 1.0)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-3)  # same half logits, fp32 softmax
    g_fused = torch.autograd.grad(fused * 1024.0, [features, decoder.weight, decoder.bias])  # a loss scale
    g_plain = torch.autograd.grad(plain * 1024.0, [features, decoder.weight, decoder.bias])
    for a, b in zip(g_fused, g_plain):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a / 1024.0, b / 1024.0, rtol=2e-2, atol=2e-3)
    with torch.no_grad():  # no gradient wanted: the plain computation
        assert decoder_cross_entropy(features, decoder, targets, 1.0).item() == pytest.approx(
            masked_lm_loss(decoder(features), targets, 1.0).item())
    empty = decoder_cross_entropy(torch.zeros(0, 16, requires_grad=True), decoder, targets[:0], 1.0)
    assert empty.item() == 0.0 and empty.requires_grad


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_decoder_cross_entropy_is_as_accurate_as_mixed_precision_on_full_logits(half):
    """At BERT's vocabulary size most softmax probabilities (~1/30k) are fp16 subnormals, and the chunked
    gradient is formed in 16 bits without a loss scale. Its error against fp64 must still be no larger than
    that of plain mixed precision: 16-bit logits, fp32 cross-entropy, gradient scaled by 2^16."""
    torch.manual_seed(0)
    n, hidden, vocab = 512, 32, 30522
    decoder = torch.nn.Linear(hidden, vocab)
    with torch.no_grad():
        decoder.weight.normal_(0, 0.05)
    features = torch.randn(n, hidden) * 2
    targets = torch.randint(0, 2000, (n,))  # frequent tokens repeat, as in text

    def grads(loss_fn, dtype, scale):
        f = features.to(dtype).requires_grad_()
        d = torch.nn.Linear(hidden, vocab).to(dtype)
        d.load_state_dict({k: v.to(dtype) for k, v in decoder.state_dict().items()})
        with torch.autocast("cpu", dtype=half, enabled=dtype == torch.float32):
            loss = loss_fn(f, d)
        return [g.double() / scale for g in torch.autograd.grad(loss.float() * scale, [f, d.weight, d.bias])]

    from coco_accel.training import losses

    exact = grads(lambda f, d: masked_lm_loss(d(f), targets, float(n)), torch.float64, 1.0)
    chunked = grads(lambda f, d: losses.decoder_cross_entropy(f, d, targets, float(n)), torch.float32, 2.0 ** 16)
    amp = grads(lambda f, d: masked_lm_loss(d(f), targets, float(n)), torch.float32, 2.0 ** 16)
    for ours, theirs, ref, name in zip(chunked, amp, exact, ("features", "weight", "bias")):
        err = ((ours - ref).norm() / ref.norm()).item()
        assert err <= 1.05 * ((theirs - ref).norm() / ref.norm()).item() and err < 5e-3, name


@pytest.mark.parametrize("chunk", [0, 3])
@pytest.mark.parametrize("layout_kind", ["pack", "groups"])
def test_a_batch_is_planned_once_on_the_host(chunk, layout_kind, monkeypatch):
    """The layout (lengths, masked slots) is computed once, when the batch is built on the host; the step
    and the model (packed rows, length groups, the gradient cache's chunks) plan from it and never compute
    it again, nor read the device tensors to learn it (on a GPU each read waits for the queued work)."""
    from transformers import BertConfig, BertForMaskedLM

    from coco_accel.model import packing
    from coco_accel.model.condenser import Condenser
    from coco_accel.training.batches import Batch
    from coco_accel.training.step import StepSettings, cached_step, plain_step

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    extra = dict(pack_length=24) if layout_kind == "pack" else dict(length_bucket_width=4, length_bucket_call_cost=0)
    model = Condenser(BertForMaskedLM(cfg), n_head_layers=2, skip_from=2, late_mlm=True, **extra).double()
    ids, mask, labels = span_batch([20, 3, 7, 12, 5, 20, 9, 4])
    batch = Batch.of({"input_ids": ids, "attention_mask": mask, "labels": labels}, step=0, rank_docs=[4])
    assert batch.layout[:, 0].tolist() == [20, 3, 7, 12, 5, 20, 9, 4] and batch.row_counts == [8]

    def no_reads(*args):
        raise AssertionError("the layout was computed again")

    monkeypatch.setattr(packing, "host_layout", no_reads)
    for tensor_read in ("tolist", "numpy", "cpu", "item"):  # what reading the device tensors would call
        real = getattr(torch.Tensor, tensor_read)
        monkeypatch.setattr(torch.Tensor, tensor_read, lambda t, *a, _real=real, **k: (
            _real(t, *a, **k) if t.dim() != 2 or t.dtype != torch.int64  # the batch's rows, or chunks of them
            else pytest.fail(f"read {tensor_read} of a batch tensor")))
    device_batch = {k: v.clone() for k, v in batch.tensors.items()}
    backward = lambda loss, last: loss.backward()
    if chunk:
        parts = cached_step(model, device_batch, backward, StepSettings(), layout=batch.layout, chunk_size=chunk)
    else:
        parts = plain_step(model, device_batch, backward, StepSettings(), layout=batch.layout)
    assert parts.spans == 8 and parts.real_tokens == 80 and torch.isfinite(parts.loss)


def test_the_trainers_autocast_reaches_the_vocabulary_projection(monkeypatch):
    """Accelerate autocasts only the model's forward; the step runs the losses under `accelerator.autocast`
    too, so the MLM vocabulary projection (outside the model) computes in bf16, not fp32, as the
    benchmark measured it; the contrastive scores stay fp32."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import BertConfig, BertForMaskedLM

    from coco_accel.model.condenser import Condenser
    from coco_accel.training import losses
    from coco_accel.training.step import StepSettings, plain_step

    seen = []
    real = losses._DecoderCrossEntropy.apply
    monkeypatch.setattr(losses._DecoderCrossEntropy, "apply", lambda *a: seen.append(a[4]) or real(*a))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
    model = Condenser(BertForMaskedLM(cfg), n_head_layers=2, skip_from=2, late_mlm=True, pack_length=24)
    mask = (torch.arange(20)[None, :] < torch.tensor([20, 3, 7, 12])[:, None]).long()
    ids = torch.where(mask.bool(), torch.randint(5, 120, (4, 20)), 0)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    try:
        for compute in (accelerator.autocast, None):
            extra = {"compute": compute} if compute else {}
            plain_step(model, batch, lambda loss, last: loss.backward(), StepSettings(), layout=host_layout(mask, batch["labels"]), **extra)
    finally:
        AcceleratorState._reset_state(True)
    assert seen == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]  # head and backbone, twice


@pytest.mark.parametrize("pack, compiled", [(0, False), (24, False), pytest.param(24, True, marks=pytest.mark.slow)])
def test_gradient_cache_replays_the_first_pass_dropout(pack, compiled, monkeypatch):
    """With dropout on, each chunk's replay (with graph) draws the dropout of its first pass (without), so
    the CLS vectors it backpropagates through are the ones the contrastive loss was computed on. Any
    difference in what the two passes compute (which layers, at which slots) would draw other masks.
    Compiled (--torch_compile), the first pass runs inference graphs and the replay training graphs, whose
    fused dropout must draw alike too; there one head layer (the partial one) and two equal chunks keep the
    graphs to compile at 7 (C++ compilation is most of this test's time on a CPU)."""
    from transformers import BertConfig, BertForMaskedLM

    from coco_accel.model.condenser import Condenser
    from coco_accel.training.step import StepSettings, cached_step

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = Condenser(BertForMaskedLM(cfg), n_head_layers=1 if compiled else 2, skip_from=2, late_mlm=True,
                      pack_length=pack).train()
    chunk = 4 if compiled else 3  # chunks of 4 and 4 spans, or of 3, 3 and 2
    if compiled:
        model.compile_parts()
    ids, mask, labels = span_batch([20, 3, 7, 12, 5, 20, 9, 4])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    seen = record_cls(monkeypatch)
    cached_step(model, batch, lambda loss, last: loss.backward(), StepSettings(), chunk_size=chunk, layout=host_layout(batch["attention_mask"], batch["labels"]))
    n = -(-8 // chunk)
    first, replay = seen[:n], seen[n:]
    assert len(first) == len(replay) == n
    for a, b in zip(first, replay):
        assert torch.equal(a, b)
    unseeded = model(ids[:chunk], mask[:chunk], labels[:chunk], host_layout(mask[:chunk], labels[:chunk])).cls.detach()  # another draw of the dropout
    assert not torch.equal(unseeded, first[0])


def _two_process_step(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as td
    from transformers import BertConfig, BertForMaskedLM

    from coco_accel.model.condenser import Condenser
    from coco_accel.training.step import StepSettings, plain_step

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        cfg = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)
        model = Condenser(BertForMaskedLM(cfg), n_head_layers=1, skip_from=1, late_mlm=True, pack_length=24)
        ids, mask, labels = span_batch([20, 3, 7, 12])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        parts = plain_step(model, batch, lambda loss, last: loss.backward(), StepSettings(), layout=host_layout(batch["attention_mask"], batch["labels"]))
        dtypes = {str(t.dtype) for t in (parts.mlm_head, parts.mlm_backbone, parts.contrastive)}
        (Path(out_dir) / f"rank{rank}").write_text(",".join(sorted(dtypes)))
    finally:
        td.destroy_process_group()


def test_losses_stay_float32_with_several_processes(tmp_path):
    """With two processes the normalisers are all-reduced on the device and divide the losses there: in
    float32, so the losses keep the dtype they have in one process."""
    import torch.multiprocessing as mp
    from conftest import free_port

    mp.spawn(_two_process_step, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["torch.float32", "torch.float32"]


@pytest.mark.parametrize("late_mlm", [True, False])
def test_step_parts_keep_the_losses_dtype_and_the_cache_equals_the_plain_step(late_mlm):
    """fp64 model: the parts a step reports are fp64 (the cached step once summed them into float32 zeros,
    rounding an fp64 run's report), and the cached step's parts are the plain step's to 1e-12."""
    from transformers import BertConfig, BertForMaskedLM

    from coco_accel.model.condenser import Condenser
    from coco_accel.training.step import StepSettings, cached_step, chunk_sizes, plain_step

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = Condenser(BertForMaskedLM(cfg), n_head_layers=2, skip_from=2, late_mlm=late_mlm,
                      pack_length=24).double().train()
    ids, mask, labels = span_batch([20, 3, 7, 12, 5, 20, 9, 4])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    plain = plain_step(model, batch, lambda loss, last: None, StepSettings(), layout=host_layout(batch["attention_mask"], batch["labels"]))
    cached = cached_step(model, batch, lambda loss, last: None, StepSettings(), chunk_size=3, layout=host_layout(batch["attention_mask"], batch["labels"]))
    for name in ("mlm_head", "mlm_backbone", "contrastive"):
        a, b = getattr(plain, name), getattr(cached, name)
        assert a.dtype == b.dtype == torch.float64, name
        assert b.item() == pytest.approx(a.item(), rel=1e-12, abs=1e-300), name
    assert chunk_sizes(8, 3) == [3, 3, 2] and chunk_sizes(8, 3, [8, 10]) == [2, 2, 2, 2]
    assert chunk_sizes(10, 3, [8, 10]) == [3, 3, 2, 2]
