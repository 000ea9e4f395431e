"""Every encoder family as a Condenser backbone (`model/families/`: BERT, RoBERTa, XLM-R, ModernBERT): packed
rows and length groups == the plain padded HF computation in fp64, the backbone's masked-LM logits ==
transformers' own MLM model, the gradient cache == the plain step; for ModernBERT also the warm start,
head copy, export round trip and a run of the real trainer.

Tolerance: fp64 throughout (eps 1.1e-16). Packed and padded rows run the same arithmetic on differently
shaped matmuls, so they differ by the rounding of their sums. Outputs and losses are O(1): a layer's
sums of ~50 terms round to ~50 x 1.1e-16 x 6 layers ~ 3e-14. A weight's gradient sums over every token of
the batch (~100 here) after the backward through the same layers: its absolute error is ~100 x 3e-14 x
the largest per-token term (O(1) at most here) ~ 3e-12. So atol 1e-10 with rtol 1e-8 (as the BERT
exactness tests use), 30x above the bound and 1e7 below a real difference (the negative control moves
CLS by more than 1e-3).
"""

import pytest
import torch

from conftest import span_batch
from coco_accel.model.condenser import Condenser
from coco_accel.model.packing import host_layout



FAMILIES = ["bert", "roberta", "xlm-roberta", "modernbert"]
PAD = {"bert": 0, "roberta": 1, "xlm-roberta": 1, "modernbert": 0}


def tiny_mlm(family: str, vocab: int = 120, seed: int = 0):
    """A randomly initialised masked-LM of `family` in fp64, 4 layers, 32 wide, no dropout."""
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM, XLMRobertaConfig, \
        XLMRobertaForMaskedLM

    if family == "modernbert":
        return tiny_modernbert(vocab=vocab, seed=seed)
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=48,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    if family == "bert":
        return BertForMaskedLM(BertConfig(max_position_embeddings=64, **common)).double()
    cls, cfg = ((RobertaForMaskedLM, RobertaConfig) if family == "roberta" else (XLMRobertaForMaskedLM, XLMRobertaConfig))
    return cls(cfg(max_position_embeddings=40, pad_token_id=1, **common)).double()


def tiny_modernbert(vocab: int = 120, layers: int = 4, seed: int = 0, **extra):
    """A randomly initialised ModernBERT MLM in fp64: alternating global and sliding-window layers with a
    4-position half window, so spans longer than 5 tokens see the window."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(seed)
    cfg = ModernBertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                           num_attention_heads=2, max_position_embeddings=256, local_attention=8,
                           global_attn_every_n_layers=2, pad_token_id=0, cls_token_id=1, sep_token_id=2,
                           bos_token_id=1, eos_token_id=2, mask_token_id=3, attn_implementation="sdpa", **extra)
    return ModernBertForMaskedLM(cfg).double()


def _condenser(mlm, **kw) -> Condenser:
    settings = dict(n_head_layers=2, skip_from=2, late_mlm=True)
    settings.update(kw)
    return Condenser(mlm, **settings)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=what)


def _outputs_and_grads(model: Condenser, ids, mask, labels):
    """The forward's outputs, its MLM losses (whatever order the masked tokens come in) and the gradients of
    a loss that reaches every parameter."""
    model.zero_grad()
    out = model(ids, mask, labels, host_layout(mask, labels))
    ce = torch.nn.functional.cross_entropy
    losses = {"head": ce(out.head_logits, out.targets, reduction="sum"),
              "backbone": ce(out.backbone_logits, out.targets, reduction="sum"), "cls": out.cls.square().sum()}
    (losses["head"] + 2 * losses["backbone"] + losses["cls"]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, losses, grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["pack", "groups", "pack, mean pooling"])
def test_packed_rows_and_length_groups_equal_the_padded_hf_computation(family, layout, monkeypatch):
    """Spans up to 20 tokens (past ModernBERT's 4-position window), packed into rows of 24 or grouped by
    length, against padded rows through transformers' own layers and masks: CLS, head and backbone MLM
    features, and every parameter's gradient. Negative controls: packed rows whose spans see each other
    differ; for ModernBERT, packed rows that ignore the sliding window differ."""
    from coco_accel.model.families.base import Rows

    ids, mask, labels = span_batch([20, 3, 7, 12, 5, 20, 9, 4], pad_id=PAD[family])
    pooling = "mean" if "mean" in layout else "cls"
    padded = _condenser(tiny_mlm(family), pooling=pooling)
    other = _condenser(tiny_mlm(family), pooling=pooling, **(
        dict(pack_length=24) if layout.startswith("pack") else dict(length_bucket_width=4, length_bucket_call_cost=0)))
    other.load_state_dict(padded.state_dict())
    ref, ref_losses, ref_grads = _outputs_and_grads(padded, ids, mask, labels)
    got, losses, grads = _outputs_and_grads(other, ids, mask, labels)
    _close(got.cls, ref.cls, "cls")  # in input order either way
    for name in ref_losses:
        _close(losses[name], ref_losses[name], name)
    if layout.startswith("pack"):  # masked tokens in (span, position) order, as padded rows give them
        for name in ("head_features", "backbone_features", "targets"):
            _close(getattr(got, name), getattr(ref, name), name)
    assert ref_grads.keys() == grads.keys() and len(grads) == len(list(padded.parameters()))
    for name in ref_grads:
        _close(grads[name], ref_grads[name], name)
    if pooling == "mean":  # the mean of each span's last-layer tokens, as sentence-transformers pools them
        with torch.no_grad():
            last = padded.mlm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            _close(got.cls.detach(), (last * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True), "mean pooling")
    if layout == "pack":
        with monkeypatch.context() as patch:  # every slot of a row attends to every other: spans mix
            patch.setattr(Rows, "same_span", lambda self, queries=None: torch.ones(
                (self.segment.shape[0], 1, self.segment.shape[1] if queries is None else len(queries) //
                 self.segment.shape[0], self.segment.shape[1]), dtype=torch.bool, device=self.segment.device))
            mixed = other(ids, mask, labels, host_layout(mask, labels))
        assert (mixed.cls - ref.cls).abs().max() > 1e-3
    if layout == "pack" and family == "modernbert":
        other.mlm.config.local_attention = 1000  # the window now spans every span: a different model
        wrong = other(ids, mask, labels, host_layout(mask, labels))
        assert (wrong.cls - ref.cls).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_the_backbone_mlm_logits_are_transformers_own(family):
    """With --late_mlm the backbone's masked-LM logits at the masked slots of packed rows are those of
    transformers' own masked-LM model over the padded batch (its prediction head and tied decoder, after
    ModernBERT's final norm); CLS is the last hidden state's first token, as AutoModel gives it."""
    mlm = tiny_mlm(family)
    model = _condenser(mlm, pack_length=24).eval()
    ids, mask, labels = span_batch([20, 3, 7, 12, 5, 20, 9, 4], pad_id=PAD[family])
    out = model(ids, mask, labels, host_layout(mask, labels))
    with torch.no_grad():
        hf = mlm(input_ids=ids, attention_mask=mask)
        last = mlm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    _close(out.backbone_logits.detach(), hf.logits[labels != -100], "backbone logits")
    _close(out.cls.detach(), last[:, 0], "cls")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_the_gradient_cache_equals_the_plain_step(family, pooling):
    """cached_step (chunks of 3 spans) == plain_step on packed rows: losses and gradients."""
    from coco_accel.training.step import StepSettings, cached_step, plain_step

    ids, mask, labels = span_batch([20, 3, 7, 12, 5, 20, 9, 4], pad_id=PAD[family])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    results = []
    for chunk in (0, 3):
        model = _condenser(tiny_mlm(family), pack_length=24, pooling=pooling)
        backward = lambda loss, last: loss.backward()
        layout = host_layout(mask, labels)
        parts = (cached_step(model, batch, backward, StepSettings(), layout=layout, chunk_size=chunk) if chunk
                 else plain_step(model, batch, backward, StepSettings(), layout=layout))
        results.append((parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, g_plain), (cached, g_cached) = results
    _close(cached.loss, plain.loss, "loss")
    assert g_plain.keys() == g_cached.keys()
    for name in g_plain:
        _close(g_cached[name], g_plain[name], name)


def test_warm_start_head_copy_and_export_round_trip(tmp_path, tokenizer):
    """A plain ModernBERT MLM folder warm-starts a Condenser; --head_init copy gives the head the backbone's
    last layers (each keeping its attention kind) and its final norm; the export loads in AutoModel with
    the same CLS vectors, and as a warm start it brings its head, norm included."""
    from transformers import AutoModel

    from coco_accel.model.export import save_export
    from coco_accel.model.warm_start import load_condenser

    mlm = tiny_modernbert(vocab=len(tokenizer))
    with torch.no_grad():
        mlm.model.final_norm.weight.uniform_(0.5, 1.5)
    mlm.float().save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    model = load_condenser(str(tmp_path / "mlm"), n_head_layers=2, skip_from=2, late_mlm=False, head_init="copy",
                           pack_length=32)
    layers = model.family.layers
    for head_layer, layer in zip(model.c_head, layers[-2:]):
        assert head_layer.attention_type == layer.attention_type
        assert all(torch.equal(a, b) for a, b in zip(head_layer.state_dict().values(), layer.state_dict().values()))
    assert torch.equal(model.c_head_norm.weight, model.mlm.model.final_norm.weight)

    with torch.no_grad():
        model.c_head_norm.weight.add_(0.25)  # a head norm of its own, to be found again after the round trip
    save_export(model, tokenizer, str(tmp_path / "export"))
    ids, mask, labels = span_batch([9, 4, 7], vocab=len(tokenizer))
    auto = AutoModel.from_pretrained(tmp_path / "export").eval()
    model.eval()
    with torch.no_grad():
        ours = model(ids, mask, labels, host_layout(mask, labels)).cls
        theirs = auto(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)  # fp32: packed vs padded rounding
    from sentence_transformers import SentenceTransformer

    texts = ["dense retrieval on a new corpus", "the head is left out of the export's encoder"]
    st = SentenceTransformer(str(tmp_path / "export"), device="cpu").encode(texts, convert_to_tensor=True)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = auto(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[:, 0]
    torch.testing.assert_close(st, cls, rtol=1e-5, atol=1e-6)  # CLS pooling, no normalisation
    again = load_condenser(str(tmp_path / "export"), n_head_layers=2, skip_from=2, late_mlm=False, strict_head=True)
    assert torch.equal(again.c_head_norm.weight, model.c_head_norm.weight)
    for a, b in zip(again.c_head.parameters(), model.c_head.parameters()):
        assert torch.equal(a, b)


def test_the_trainer_runs_a_modernbert_with_mean_pooling_and_in_training_evaluation(tmp_path, tokenizer, span_data):
    """Through coco_accel/train.py: a ModernBERT folder, the head copied from its last layers, packed rows,
    the gradient cache, --pooling mean, and retrieval on a BEIR folder at steps 0 and 3 (mean-pooled, as
    --pooling), whose last numbers are what `python -m coco_accel.evaluation --pooling mean` gives the
    export; the export's sentence-transformers config pools the mean, and its vectors are AutoModel's
    masked mean."""
    import json

    from conftest import make_tiny_modernbert, metrics, run_main, train_args, write_docstring_beir

    model = make_tiny_modernbert(tmp_path / "model", tokenizer)
    beir = write_docstring_beir(tmp_path / "beir" / "docstrings")
    out = tmp_path / "run"
    run = run_main("train", *train_args(model, span_data, out, max_steps=3, per_device_train_batch_size=8,
                                        head_init="copy", cache_chunk_size=6, eval_data=beir, eval_steps=3,
                                        pooling="mean",
                                        learning_rate="1e-3", logging_steps=1, save_steps=0, report_to="none"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "copies of the backbone's last layers" in run.stderr
    records = metrics(out)
    assert len(records) == 3 and all(r["loss"] == r["loss"] and r["mlm_head"] > 0 for r in records)
    evals = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "eval/seconds" in r]
    assert [r["step"] for r in evals] == [0, 3]
    result = tmp_path / "export_eval.json"
    done = run_main("evaluation.__main__", "--model", out, "--data", beir, "--batch_size", "16", "--pooling", "mean",
                    "--output", result)
    assert done.returncode == 0, done.stderr[-3000:]
    export = json.loads(result.read_text())["datasets"]["docstrings"]
    assert export["ndcg@10"] == pytest.approx(evals[-1]["eval/docstrings/ndcg@10"], abs=1e-6)

    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    texts = ["dense retrieval on a new corpus", "mean pooling of the span's tokens"]
    st = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        last = AutoModel.from_pretrained(out).eval()(**enc).last_hidden_state
    mask = enc["attention_mask"][:, :, None].float()
    torch.testing.assert_close(st, (last * mask).sum(1) / mask.sum(1), rtol=1e-5, atol=1e-6)
