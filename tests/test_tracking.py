"""The metrics meter: global means, throughput, model FLOP/s and MFU."""

import pytest
import torch

from coco_accel.training.step import StepParts
from coco_accel.training.tracking import useful_flops_per_token
from coco_accel.training.tracking import Meter


def test_useful_flops_count_by_hand():
    from transformers import BertConfig

    cfg = BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=3, intermediate_size=32)
    dense = 5 * (4 * 64 + 2 * 8 * 32)  # 3 backbone + 2 head layers
    attention = 5 * 2 * 8 * 10.0  # spans of 10 tokens
    mlm = 2 * 0.15 * (64 + 8 * 100)  # transform + projection at 15% of the tokens, head and backbone
    assert useful_flops_per_token(cfg, n_head_layers=2, avg_len=10.0, mlm_fraction=0.15,
                                  late_mlm=True) == pytest.approx(6 * (dense + attention + mlm))
    assert useful_flops_per_token(cfg, n_head_layers=2, avg_len=10.0, mlm_fraction=0.15,
                                  late_mlm=False) == pytest.approx(6 * (dense + attention + mlm / 2))


def _counted_flops(cfg, spans: int, length: int, masked: int) -> int:
    """FLOPs of one training step of the Condenser's computation as defined, counted by torch's FlopCounterMode
    on plain HF modules: `spans` unpadded spans of `length` tokens through the backbone, 2 head layers over
    [last layer's CLS, layer 1's tokens], and the MLM head at `masked` tokens of each span, for the head and the
    backbone (late MLM); forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    mlm, head = BertForMaskedLM(cfg), BertForMaskedLM(cfg).bert.encoder.layer[:2]
    ids = torch.randint(5, cfg.vocab_size, (spans, length))
    with FlopCounterMode(display=False) as counter:
        out = mlm.bert(ids, output_hidden_states=True)
        x = torch.cat([out.last_hidden_state[:, :1], out.hidden_states[1][:, 1:]], dim=1)
        for layer in head:
            y = layer(x)
            x = y[0] if isinstance(y, tuple) else y
        (mlm.cls(x[:, 1:1 + masked]).sum() + mlm.cls(out.last_hidden_state[:, 1:1 + masked]).sum()).backward()
    return counter.get_total_flops()


def _flops_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                      attn_implementation="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_useful_flops_are_the_matmul_flops_of_the_computation():
    """The formula behind the logged TFLOP/s and MFU equals an independent count of the matrix products of
    the unpadded computation (both count 2 per multiply-add; spans of equal length, so that the attention's
    quadratic term is exact at the mean length)."""
    cfg = _flops_config()
    for length, masked in ((10, 2), (20, 3)):
        expected = _counted_flops(cfg, 4, length, masked)
        assert useful_flops_per_token(cfg, n_head_layers=2, avg_len=length, mlm_fraction=masked / length,
                                      late_mlm=True) * 4 * length == pytest.approx(expected, rel=1e-12)


def test_meter_means_throughput_and_mfu():
    """Two steps of 4 spans of 10 real tokens (16 computed: padding): the logged loss parts are the steps'
    means, the model TFLOP/s those of the real tokens' computation (counted independently), not of padding."""
    cfg = _flops_config()
    per_token = lambda avg_len: useful_flops_per_token(cfg, n_head_layers=2, avg_len=avg_len, mlm_fraction=0.2,
                                                       late_mlm=True)
    meter = Meter(torch.device("cpu"), flops_per_token=per_token, peak_tflops=2.0)
    for head, correct in ((2.0, 3), (4.0, 1)):
        meter.add(StepParts(torch.tensor(head), torch.tensor(1.0), torch.tensor(0.5), torch.tensor(correct),
                            spans=4, real_tokens=40, computed_tokens=64), grad_norm=torch.tensor(2.0))
    record = meter.flush(step=2, lr=1e-4, docs_seen=4)
    assert record["mlm_head"] == 3.0 and record["loss"] == 3.0 + 1.0 + 0.5
    assert record["contrastive_acc"] == 4 / 8 and record["grad_norm"] == 2.0
    assert record["padding_fraction"] == pytest.approx(1 - 80 / 128)
    elapsed = record["seconds_per_step"] * 2
    assert record["real_tokens_per_s"] == pytest.approx(80 / elapsed)
    flops = 2 * _counted_flops(cfg, 4, 10, 2)
    assert record["model_tflops_per_s"] * 1e12 * elapsed == pytest.approx(flops, rel=1e-9)
    assert record["mfu"] * 2.0e12 * elapsed == pytest.approx(flops, rel=1e-9)
    no_peak = Meter(torch.device("cpu"), flops_per_token=per_token)
    no_peak.add(StepParts(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0), spans=2,
                          real_tokens=20, computed_tokens=32), grad_norm=None)
    record = no_peak.flush(step=1, lr=1e-4, docs_seen=1)
    assert "model_tflops_per_s" in record and "mfu" not in record


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_overflow_steps_are_counted_and_leave_the_weights(fused):
    """A step whose scaled gradients overflow is skipped by the loss scaler: the weights stay as they were and
    the meter counts it, also with fused AdamW, which takes found_inf into its kernel and whose step Accelerate
    therefore sees called (its step_was_skipped says False). The next, finite step updates and is not counted."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from coco_accel.training.optim import step_counting_overflow

    Accelerator(cpu=True)  # the state AcceleratedOptimizer reads (Accelerate builds no fp16 scaler on the CPU)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused), device_placement=False,
                               scaler=scaler)
    meter = Meter(torch.device("cpu"))
    x = torch.randn(3, 4)
    parts = StepParts(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0), spans=2,
                      real_tokens=20, computed_tokens=32)
    for factor, overflows in ((1e36, 1), (1.0, 0)):  # 1e36 x the scale 2^16 is past float32's 3.4e38
        before = [p.detach().clone() for p in model.parameters()]
        scaler.scale(model(x).sum() * factor).backward()
        overflow = step_counting_overflow(opt, scaler)
        opt.zero_grad(set_to_none=True)
        meter.add(parts, grad_norm=None, overflow=overflow)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert int(overflow) == overflows and unchanged == bool(overflows)
        if overflows:
            assert opt.step_was_skipped != fused  # what Accelerate alone would have logged
    assert scaler.get_scale() == 2.0**15  # halved once, on the overflow
    assert meter.flush(step=2, lr=0.1, docs_seen=4, loss_scale=scaler.get_scale())["overflow_steps"] == 1
    assert step_counting_overflow(torch.optim.SGD(model.parameters(), lr=0.1), None) is None  # bf16, fp32
