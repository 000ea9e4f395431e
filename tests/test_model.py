"""Condenser wiring, MLM at masked positions only, warm starts and export."""

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import span_batch
from coco_accel.model.packing import host_layout
from coco_accel.model.condenser import Condenser, ModelError
from coco_accel.model.export import save_export
from coco_accel.model.warm_start import HEAD_FILE, load_condenser


def _tiny(vocab=120, layers=4):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg)


def _inputs(n=3, length=9, vocab=120):
    ids = torch.randint(5, vocab, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 6:] = 0
    labels = torch.full((n, length), -100)
    labels[:, 2] = ids[:, 2]
    labels[1, 4] = ids[1, 4]
    return ids, mask, labels


def test_head_reads_last_layer_cls_and_skip_from_tokens():
    model = Condenser(_tiny(), n_head_layers=2, skip_from=2, late_mlm=True)
    seen = {}
    model.c_head[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("input", args[0].detach()))
    ids, mask, labels = _inputs()
    out = model(ids, mask, labels, host_layout(mask, labels))
    hidden = model.mlm.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.allclose(seen["input"][:, 0], hidden[-1][:, 0])
    assert torch.allclose(seen["input"][:, 1:], hidden[2][:, 1:])
    assert torch.allclose(out.cls, hidden[-1][:, 0])


def test_logits_only_at_masked_positions():
    model = Condenser(_tiny(), n_head_layers=2, skip_from=2, late_mlm=True)
    ids, mask, labels = _inputs()
    out = model(ids, mask, labels, host_layout(mask, labels))
    assert out.head_logits.shape == (4, 120) and out.backbone_logits.shape == (4, 120)
    assert torch.equal(out.targets, labels[labels != -100])
    # The backbone logits are the backbone's own MLM head on its last layer.
    full = model.mlm(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(out.backbone_logits, full[labels != -100], atol=1e-5)
    assert Condenser(_tiny(), n_head_layers=2, skip_from=2, late_mlm=False)(ids, mask, labels, host_layout(mask, labels)).backbone_logits is None


def test_head_is_the_backbones_layer_class_with_its_init():
    mlm = _tiny()
    model = Condenser(mlm, n_head_layers=3, skip_from=1, late_mlm=False)
    assert len(model.c_head) == 3
    assert all(type(layer) is type(mlm.bert.encoder.layer[0]) for layer in model.c_head)
    w = model.c_head[0].attention.self.query.weight
    assert w.std().item() == pytest.approx(mlm.config.initializer_range, rel=0.2)


def test_skip_from_outside_the_layers_is_refused():
    with pytest.raises(ModelError, match="skip_from 5"):
        Condenser(_tiny(layers=4), n_head_layers=2, skip_from=5, late_mlm=False)


def test_backbone_dropout_stays_on_in_training():
    from transformers import BertConfig, BertForMaskedLM

    mlm = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, hidden_dropout_prob=0.5))
    model = Condenser(mlm, n_head_layers=1, skip_from=1, late_mlm=False).train()
    ids, mask, labels = _inputs(vocab=50)
    assert not torch.allclose(model(ids, mask, labels, host_layout(mask, labels)).cls, model(ids, mask, labels, host_layout(mask, labels)).cls)


def test_export_reloads_with_automodel_and_head_round_trips(tmp_path, tokenizer):
    from transformers import AutoModel, AutoTokenizer

    model = Condenser(_tiny(vocab=len(tokenizer)), n_head_layers=2, skip_from=2, late_mlm=True)
    save_export(model, tokenizer, str(tmp_path))
    assert (tmp_path / HEAD_FILE).is_file()
    auto, info = AutoModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"], info  # nothing newly initialised
    from transformers import AutoModelForMaskedLM

    _, mlm_info = AutoModelForMaskedLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not mlm_info["missing_keys"], mlm_info  # the pooler may be reported unused: it is
    ids, mask, _ = _inputs(vocab=len(tokenizer))
    torch.testing.assert_close(auto(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0],
                               model.encode(ids, mask))
    assert AutoTokenizer.from_pretrained(str(tmp_path)).vocab_size == tokenizer.vocab_size
    again = load_condenser(str(tmp_path), n_head_layers=2, skip_from=2, late_mlm=True, strict_head=True)
    for a, b in zip(model.c_head.parameters(), again.c_head.parameters()):
        assert torch.equal(a, b)


def test_reference_condenser_checkpoint_with_model_pt(tmp_path):
    """The reference wrote HF weights plus model.pt holding the head as c_head.* keys."""
    model = Condenser(_tiny(), n_head_layers=2, skip_from=2, late_mlm=True)
    model.mlm.save_pretrained(tmp_path)
    torch.save({f"c_head.{k}": v for k, v in model.c_head.state_dict().items()}, tmp_path / "model.pt")
    loaded = load_condenser(str(tmp_path), n_head_layers=2, skip_from=2, late_mlm=True, strict_head=True)
    for a, b in zip(model.c_head.parameters(), loaded.c_head.parameters()):
        assert torch.equal(a, b)
    ids, mask, labels = _inputs()
    torch.testing.assert_close(loaded(ids, mask, labels, host_layout(mask, labels)).head_logits, model(ids, mask, labels, host_layout(mask, labels)).head_logits)


def test_plain_mlm_checkpoint_gets_a_fresh_head_unless_strict(tmp_path, caplog):
    _tiny().save_pretrained(tmp_path)
    with caplog.at_level("INFO"):
        load_condenser(str(tmp_path), n_head_layers=2, skip_from=2, late_mlm=False)
    assert "start from the backbone's initialisation" in caplog.text
    with pytest.raises(ModelError, match="--strict_head"):
        load_condenser(str(tmp_path), n_head_layers=2, skip_from=2, late_mlm=False, strict_head=True)
    with pytest.raises(ModelError, match="no config.json"):
        load_condenser(str(tmp_path / "missing"), n_head_layers=2, skip_from=2, late_mlm=False)


def test_head_init_copy_starts_the_head_from_the_backbones_last_layers(tmp_path, caplog):
    mlm = _tiny()
    mlm.save_pretrained(tmp_path)
    layers = mlm.base_model.encoder.layer
    with caplog.at_level("INFO"):
        model = load_condenser(str(tmp_path), n_head_layers=2, skip_from=2, late_mlm=False, head_init="copy")
    assert "copies of the backbone's last layers" in caplog.text
    for head_layer, layer in zip(model.c_head, layers[len(layers) - 2:]):
        names = [name for name, _ in head_layer.named_parameters()]
        assert names == [name for name, _ in layer.named_parameters()]
        for a, b in zip(head_layer.parameters(), layer.parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # equal values, not shared tensors
    random = load_condenser(str(tmp_path), n_head_layers=2, skip_from=2, late_mlm=False)
    assert not torch.equal(next(random.c_head.parameters()), next(model.c_head.parameters()))
    with pytest.raises(ModelError, match="--head_init copy needs at least"):
        load_condenser(str(tmp_path), n_head_layers=len(layers) + 1, skip_from=2, late_mlm=False, head_init="copy")


@pytest.mark.parametrize("width", [1, 4, 16, 1000])
def test_length_buckets_give_the_padded_result(width):
    """Rows grouped by length, each group cut to its longest row == the whole batch padded to its longest."""
    torch.manual_seed(1)
    plain = Condenser(_tiny(), n_head_layers=2, skip_from=2, late_mlm=True)
    bucketed = Condenser(_tiny(), n_head_layers=2, skip_from=2, late_mlm=True, length_bucket_width=width)
    bucketed.load_state_dict(plain.state_dict())
    n, length = 9, 20
    lengths = torch.tensor([20, 3, 7, 12, 5, 20, 9, 4, 16])
    ids = torch.randint(5, 120, (n, length))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.full((n, length), -100)
    for r in range(n):
        labels[r, 1] = ids[r, 1]
        labels[r, int(lengths[r]) - 2] = ids[r, int(lengths[r]) - 2]
    layout = host_layout(mask, labels)
    a, b = plain(ids, mask, labels, layout), bucketed(ids, mask, labels, layout)
    torch.testing.assert_close(a.cls, b.cls, atol=1e-5, rtol=1e-5)
    # masked positions come grouped by bucket; what the loss sees is their summed cross-entropy
    ce = torch.nn.functional.cross_entropy
    assert sorted(a.targets.tolist()) == sorted(b.targets.tolist())
    for la, lb in ((a.head_logits, b.head_logits), (a.backbone_logits, b.backbone_logits)):
        torch.testing.assert_close(ce(la, a.targets, reduction="sum"), ce(lb, b.targets, reduction="sum"),
                                   atol=1e-4, rtol=1e-6)


def test_length_groups_merge_only_where_cheaper():
    from coco_accel.model.packing import length_groups

    lengths = [10, 12, 30, 31, 100, 128, 9]
    # no call cost: every rounded width is its own group (8-token buckets), rows kept exactly once
    groups = length_groups(lengths, 8, 128, 0)
    assert [w for w, _ in groups] == [16, 32, 104, 128]
    assert sorted(r for _, rows in groups for r in rows) == list(range(len(lengths)))
    assert dict(groups)[16] == [0, 1, 6]
    # a large call cost merges everything into one group padded to the widest row
    assert length_groups(lengths, 8, 128, 10**6) == [(128, [0, 1, 6, 2, 3, 4, 5])]
    # a middling one merges the two long rows (cost 2*128 + c < 104 + 128 + 2c  <=>  c > 24)
    assert [w for w, _ in length_groups(lengths, 8, 128, 30)] == [16, 32, 128]
    # the chosen grouping is the cheapest of all contiguous groupings (brute force over the 3 cut points)
    import itertools
    widths, counts = [16, 32, 104, 128], [3, 2, 1, 1]
    cost = lambda cuts: sum(sum(counts[i:j]) * widths[j - 1] + 50 for i, j in zip((0,) + cuts, cuts + (4,)))
    brute = min(cost(c) for k in range(4) for c in itertools.combinations(range(1, 4), k))
    chosen = length_groups(lengths, 8, 128, 50)
    assert sum(len(rows) * w + 50 for w, rows in chosen) == brute
    # widths are capped at the batch's width
    assert length_groups([3, 5], 8, 6, 0) == [(6, [0, 1])]


@pytest.mark.parametrize("call_cost", [0, 40, 10**6])
def test_merged_length_groups_give_the_padded_result(call_cost):
    torch.manual_seed(1)
    plain = Condenser(_tiny(), n_head_layers=2, skip_from=2, late_mlm=True)
    grouped = Condenser(_tiny(), n_head_layers=2, skip_from=2, late_mlm=True, length_bucket_width=2,
                        length_bucket_call_cost=call_cost)
    grouped.load_state_dict(plain.state_dict())
    lengths = torch.tensor([20, 3, 7, 12, 5, 20, 9, 4, 16])
    ids = torch.randint(5, 120, (9, 20)) * (torch.arange(20)[None, :] < lengths[:, None])
    mask = (ids != 0).long()
    labels = torch.where(torch.rand(9, 20) < 0.3, ids, -100).masked_fill(mask == 0, -100)
    layout = host_layout(mask, labels)
    a, b = plain(ids, mask, labels, layout), grouped(ids, mask, labels, layout)
    torch.testing.assert_close(a.cls, b.cls, atol=1e-5, rtol=1e-5)
    assert a.computed_tokens == 9 * 20 and b.computed_tokens <= a.computed_tokens
    if call_cost == 0:
        assert b.computed_tokens == int(((lengths + 1) // 2 * 2).sum())


def test_pack_rows_places_every_span_once():
    from coco_accel.model.packing import pack_rows

    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (200,), generator=rng).tolist() + [64, 64]
    row_of, offset_of, rows = pack_rows(lengths, 64)
    used = {}
    for n, r, o in zip(lengths, row_of, offset_of):
        assert 0 <= o and o + n <= 64
        used.setdefault(r, []).append((o, o + n))
    for spans in used.values():  # no overlap inside a row
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert rows == len(used) and rows <= sum(lengths) // 64 + 3  # best fit leaves little room free
    assert pack_rows(lengths, 64) == (row_of, offset_of, rows)  # deterministic (gradient-cache replay)
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([65], 64)


def _bert_or_roberta(family: str, attn: str):
    from transformers import (BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM, XLMRobertaConfig,
                              XLMRobertaForMaskedLM)

    common = dict(vocab_size=120, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=attn)
    if family == "roberta":
        return RobertaForMaskedLM(RobertaConfig(max_position_embeddings=40, pad_token_id=1, **common))
    if family == "xlm-roberta":
        return XLMRobertaForMaskedLM(XLMRobertaConfig(max_position_embeddings=40, pad_token_id=1, **common))
    return BertForMaskedLM(BertConfig(max_position_embeddings=64, **common))


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pack", [8, 24, 64])
def test_packed_rows_give_the_padded_result(family, attn, pack):
    """Spans packed into shared rows (block-diagonal attention, per-span positions) == each span padded alone:
    CLS vectors, MLM losses and the gradients they produce."""
    torch.manual_seed(1)
    plain = Condenser(_bert_or_roberta(family, attn), n_head_layers=2, skip_from=2, late_mlm=True)
    packed = Condenser(_bert_or_roberta(family, attn), n_head_layers=2, skip_from=2, late_mlm=True, pack_length=pack)
    packed.load_state_dict(plain.state_dict())
    ids, mask, labels = span_batch([20, 3, 7, 12, 5, 20, 9, 4, 16], pad_id=0 if family == "bert" else 1,
                                   label_rate=0.3)
    ce = torch.nn.functional.cross_entropy
    losses = []
    for model in (plain, packed):
        out = model(ids, mask, labels, host_layout(mask, labels))
        loss = (ce(out.head_logits, out.targets, reduction="sum") + ce(out.backbone_logits, out.targets, reduction="sum")
                + (out.cls ** 2).sum())
        loss.backward()
        losses.append((out, loss))
    (a, la), (b, lb) = losses
    torch.testing.assert_close(a.cls, b.cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-6)
    assert sorted(a.targets.tolist()) == sorted(b.targets.tolist())
    assert b.computed_tokens < a.computed_tokens and b.computed_tokens % 8 == 0
    for (name, p), q in zip(plain.named_parameters(), packed.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_compiled_parts_give_the_eager_result():
    """--torch_compile: the embeddings, every backbone and head layer, the partial last layers and the MLM
    head are compiled (dynamic shapes, two batches of different sizes) with the eager results and
    unchanged parameter names. float64, so that the fused kernels' different summation order stays far
    below the tolerance."""
    torch.manual_seed(1)
    eager = Condenser(_bert_or_roberta("bert", "sdpa"), n_head_layers=2, skip_from=2, late_mlm=True,
                      pack_length=24).double()
    compiled = Condenser(_bert_or_roberta("bert", "sdpa"), n_head_layers=2, skip_from=2, late_mlm=True,
                         pack_length=24).double()
    compiled.load_state_dict(eager.state_dict())
    names = [name for name, _ in compiled.named_parameters()]
    compiled.compile_parts()
    assert [name for name, _ in compiled.named_parameters()] == names
    base = compiled.mlm.base_model
    assert all(getattr(m, "_compiled_call_impl", None) is not None
               for m in [base.embeddings, *base.encoder.layer, compiled.family.mlm_parts()[0], *compiled.c_head])
    assert compiled.family.layer_at is not eager.family.layer_at
    ce = torch.nn.functional.cross_entropy
    for n in (9, 14):
        ids, mask, labels = span_batch(torch.randint(3, 21, (n,)), label_rate=0.3)
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            # SDPA's math kernel: torch 2.11's compiled CPU flash-attention backward fails in float64
            # ("expected scalar type Double but found Float"; its log-sum-exp is float32).
            with sdpa_kernel(SDPBackend.MATH):
                out = model(ids, mask, labels, host_layout(mask, labels))
                loss = ce(out.head_logits, out.targets) + ce(out.backbone_logits, out.targets) + (out.cls ** 2).sum()
                loss.backward()
            results.append((loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (la, ga), (lb, gb) = results
        torch.testing.assert_close(la, lb, atol=1e-9, rtol=1e-9)
        assert len(ga) == len(gb)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-7)


def test_packing_refuses_attention_without_masks():
    mlm = _bert_or_roberta("bert", "sdpa")
    mlm.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ModelError, match="--pack_length 0"):
        Condenser(mlm, n_head_layers=2, skip_from=2, late_mlm=True, pack_length=64)


def test_roberta_backbone_dispatches_on_model_type():
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    mlm = RobertaForMaskedLM(RobertaConfig(vocab_size=120, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                           intermediate_size=32, max_position_embeddings=40, pad_token_id=1,
                                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model = Condenser(mlm, n_head_layers=2, skip_from=1, late_mlm=True, length_bucket_width=4)
    assert type(model.c_head[0]) is type(mlm.roberta.encoder.layer[0])
    ids, mask, labels = _inputs()
    out = model(ids, mask, labels, host_layout(mask, labels))
    full = mlm(input_ids=ids, attention_mask=mask).logits
    where = labels != -100
    assert out.head_logits.shape == (int(where.sum()), 120)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(ce(out.backbone_logits, out.targets, reduction="sum"),
                               ce(full[where], labels[where], reduction="sum"), atol=1e-4, rtol=1e-5)


def test_reference_backbone_without_dropout_keeps_head_dropout():
    from transformers import BertConfig, BertForMaskedLM

    from coco_accel.model.condenser import disable_backbone_dropout

    mlm = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5))
    model = Condenser(mlm, n_head_layers=1, skip_from=1, late_mlm=False).train()
    assert disable_backbone_dropout(model) > 0
    ids, mask, labels = _inputs(vocab=50)
    assert torch.allclose(model(ids, mask, labels, host_layout(mask, labels)).cls, model(ids, mask, labels, host_layout(mask, labels)).cls)  # backbone deterministic
    head_dropouts = [m for m in model.c_head.modules() if isinstance(m, torch.nn.Dropout)]
    assert head_dropouts and all(m.p == 0.5 for m in head_dropouts)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_chunked_decoder_loss_gives_the_full_logits_gradients(family, monkeypatch):
    """The step's MLM terms (vocabulary projection chunk by chunk, never all logits) == cross-entropy on
    the full logits: every parameter's gradient, the decoder weight tied to the word embeddings included."""
    from coco_accel.training import losses
    from coco_accel.training.step import _mlm_terms

    monkeypatch.setattr(losses, "DECODER_CHUNK_ELEMENTS", 5 * 120)  # 5 rows per chunk
    torch.manual_seed(1)
    model = Condenser(_bert_or_roberta(family, "sdpa"), n_head_layers=2, skip_from=2, late_mlm=True,
                      pack_length=24).double()
    ids, mask, labels = span_batch([20, 3, 7, 12, 5, 20], pad_id=0 if family == "bert" else 1)
    grads = []
    for chunked in (True, False):
        model.zero_grad()
        out = model(ids, mask, labels, host_layout(mask, labels))
        if chunked:
            head, backbone = _mlm_terms(out, 7.0)
        else:
            ce = torch.nn.functional.cross_entropy
            head = ce(out.head_logits, out.targets, reduction="sum") / 7.0
            backbone = ce(out.backbone_logits, out.targets, reduction="sum") / 7.0
        (head + 2 * backbone).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert model.mlm.get_input_embeddings().weight.grad is not None
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_fused_qkv_projections_give_the_separate_result(family, monkeypatch):
    """One matmul for query, key and value (the default) == the model's own three Linears: CLS vectors,
    MLM losses and every parameter's gradient, in fp64; parameter names are unchanged."""
    from coco_accel.model.families.bert import FusedQKV

    calls = []
    real = FusedQKV.query
    monkeypatch.setattr(FusedQKV, "query", lambda self, x: calls.append(1) or real(self, x))
    torch.manual_seed(1)
    separate = Condenser(_bert_or_roberta(family, "sdpa"), n_head_layers=2, skip_from=2, late_mlm=True, pack_length=24,
                         fused_qkv=False).double()
    fused = Condenser(_bert_or_roberta(family, "sdpa"), n_head_layers=2, skip_from=2, late_mlm=True,
                      pack_length=24).double()
    fused.load_state_dict(separate.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in separate.named_parameters()]
    ids, mask, labels = span_batch([20, 3, 7, 12, 5, 20, 9, 4], pad_id=0 if family == "bert" else 1)
    ce = torch.nn.functional.cross_entropy
    results = []
    for model in (separate, fused):
        out = model(ids, mask, labels, host_layout(mask, labels))
        loss = (ce(out.head_logits, out.targets, reduction="sum") + ce(out.backbone_logits, out.targets,
                                                                        reduction="sum") + (out.cls ** 2).sum())
        loss.backward()
        results.append((out.cls, loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert len(calls) == 3 + 2  # every backbone and head layer took the fused path, once
    (cls_a, loss_a, grads_a), (cls_b, loss_b, grads_b) = results
    torch.testing.assert_close(cls_a, cls_b, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-10, rtol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-10, rtol=1e-8, msg=name)


def test_fused_qkv_falls_back_to_separate_linears():
    """Key or value asked for another input than the query's, or ZeRO-3 parameters (only the called
    module's are gathered): each Linear computes on its own."""
    from coco_accel.model.families.bert import FusedQKV

    torch.manual_seed(0)
    q, k, v = (torch.nn.Linear(6, 4) for _ in range(3))
    fused = FusedQKV(q, k, v)
    x, y = torch.randn(2, 6), torch.randn(2, 6)
    q(x)
    torch.testing.assert_close(k(y), torch.nn.functional.linear(y, k.weight, k.bias))
    torch.testing.assert_close(v(x), torch.nn.functional.linear(x, v.weight, v.bias))  # the fused part
    assert fused.pending is None
    torch.testing.assert_close(v(y), torch.nn.functional.linear(y, v.weight, v.bias))
    q.weight.ds_id = 7  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.weight, q.bias))
    assert fused.pending is None


@pytest.mark.parametrize("n_head,skip_from,late_mlm", [(2, 2, False), (1, 3, True), (0, 1, True), (2, 0, True)])
def test_packed_rows_with_partial_last_layers_give_the_padded_result(n_head, skip_from, late_mlm):
    """The last backbone layer computed only at CLS (and masked) slots and the last head layer only at
    masked slots == the full layers: for any head depth, skip_from (3 = the last layer, read everywhere,
    computed in full) and late_mlm; also without gradient and labels."""
    torch.manual_seed(2)
    plain = Condenser(_bert_or_roberta("bert", "sdpa"), n_head_layers=n_head, skip_from=skip_from,
                      late_mlm=late_mlm).double()
    packed = Condenser(_bert_or_roberta("bert", "sdpa"), n_head_layers=n_head, skip_from=skip_from, late_mlm=late_mlm,
                       pack_length=32).double()
    packed.load_state_dict(plain.state_dict())
    ids, mask, labels = span_batch([20, 3, 7, 12, 5, 20, 9, 4, 16, 2], label_rate=0.3)
    outs = [model(ids, mask, labels, host_layout(mask, labels)) for model in (plain, packed)]
    for field in ("cls", "head_features", "backbone_features"):
        a, b = (getattr(o, field) for o in outs)
        if a is None:
            assert b is None and not late_mlm
            continue
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=field)  # both in (span, position) order
    with torch.no_grad():
        unlabelled = torch.full_like(labels, -100)
        a, b = (model(ids, mask, unlabelled, host_layout(mask, unlabelled)) for model in (plain, packed))
    torch.testing.assert_close(a.cls, b.cls, atol=1e-10, rtol=1e-10)
    assert b.head_features.shape[0] == 0


@pytest.mark.parametrize("layout", ["pack", "groups", "rows"])
def test_cls_only_skips_the_head_and_gives_the_full_forwards_cls(layout):
    """cls_only (the gradient cache's first pass, the held-out signal): CLS equals the full forward's, the
    head layers never run, the MLM outputs are empty; with or without gradient."""
    torch.manual_seed(4)
    model = Condenser(_bert_or_roberta("bert", "sdpa"), n_head_layers=2, skip_from=2, late_mlm=True,
                      pack_length=32 if layout == "pack" else 0,
                      length_bucket_width=4 if layout == "groups" else 0).double()
    ids, mask, labels = span_batch([20, 3, 7, 12, 5, 20, 9, 4, 16, 2], label_rate=0.3)
    full = model(ids, mask, labels, host_layout(mask, labels))
    calls = []
    hooks = [layer.register_forward_hook(lambda *args: calls.append(1)) for layer in model.c_head]
    try:
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                out = model(ids, mask, labels, host_layout(mask, labels), cls_only=True)
            torch.testing.assert_close(out.cls, full.cls, atol=1e-12, rtol=1e-12)
            assert out.head_features.shape == (0, 16) and out.backbone_features is None and out.targets.numel() == 0
    finally:
        for hook in hooks:
            hook.remove()
    assert not calls and full.head_features.shape[0] > 0


def test_layer_at_is_the_full_layer_at_the_wanted_slots():
    """`layer_at` (keys from every slot, the rest at wanted slots only) == the whole layer read at those
    slots, for wanted sets in any order, several per row or none in a row, and none at all."""
    from coco_accel.model.families.bert import layer_at
    from coco_accel.model.packing import query_layout

    torch.manual_seed(3)
    layer = _bert_or_roberta("bert", "sdpa").bert.encoder.layer[0].double().eval()
    rows, capacity = 3, 10
    segment = torch.tensor([[0] * 4 + [1] * 6, [2] * 7 + [-1] * 3, [3] * 2 + [4] * 5 + [5] * 3])
    hidden = torch.randn(rows, capacity, 16, dtype=torch.float64)
    same = segment[:, None, :, None] == segment[:, None, None, :]
    full = layer(hidden, same)
    full = (full[0] if isinstance(full, tuple) else full).reshape(rows * capacity, -1)
    for want in ([0, 4, 10, 20, 22, 27], [29, 3, 21, 5], [12], []):
        want = np.asarray(want, dtype=np.int64)
        queries, take, q = query_layout(want, rows, capacity)
        assert queries.shape == (rows * q,) and sorted(take.tolist()) == sorted(set(take.tolist()))
        queries, take, want_t = (torch.from_numpy(x) for x in (queries, take, want))
        attn_mask = segment.reshape(-1)[queries].view(rows, 1, q, 1) == segment[:, None, None, :]
        got = layer_at(layer, hidden, attn_mask, queries, take, want_t)
        torch.testing.assert_close(got, full[want_t], atol=1e-12, rtol=1e-12)


def test_export_loads_in_sentence_transformers_with_the_evaluation_protocol(tmp_path, tokenizer):
    """The export's modules.json and pooling config: CLS pooling, dot product, no normalisation. Its vectors
    are the evaluator's (fp32, same weights; batches pad differently, and masked padding changes attention
    sums by float32 rounding only: 1e-5 of vectors of norm ~5)."""
    st = pytest.importorskip("sentence_transformers", reason="needs sentence-transformers (make install)")
    from coco_accel.evaluation.retrieval import Encoder

    model = Condenser(_tiny(vocab=len(tokenizer)), n_head_layers=2, skip_from=2, late_mlm=True)
    save_export(model, tokenizer, str(tmp_path))
    texts = ["a cat sleeps on the mat", "dense retrieval with contrastive pretraining", "x",
             "the quick brown fox jumps over the lazy dog " * 4]
    loaded = st.SentenceTransformer(str(tmp_path), device="cpu")
    assert loaded.similarity_fn_name == "dot" and loaded.max_seq_length == 128
    assert [type(m).__name__ for m in loaded] == ["Transformer", "Pooling"]  # no Normalize
    got = loaded.encode(texts, convert_to_tensor=True, batch_size=3)
    expected = Encoder(str(tmp_path), device="cpu", batch_size=2).encode(texts, 128)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
