"""A golden per-step trace of a fixed tiny fp64 run, checked in: any change of a number (masking, span choice,
document order, the model's encoding paths, the losses, the step) fails here, so refactors prove they
change nothing. Everything the run reads is built here from fixed numbers, not from the interpreter's
docstrings or torch's initialisers, so the trace is the same on any Python and torch version.

To record it anew after a change that is meant to move the numbers:
    COCO_ACCEL_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, metrics, train_env

pytestmark = pytest.mark.slow

GOLDEN = {family: REPO / "tests" / "assets" / "losses" / f"tiny_fp64{'' if family == 'bert' else '_' + family}.json"
          for family in ("bert", "roberta", "xlm-roberta", "modernbert")}
KEYS = ("loss", "mlm_head", "mlm_backbone", "contrastive", "contrastive_acc", "grad_norm")
# fp64 sums of at most ~1e5 terms (u = 1.1e-16) in another order on another CPU or thread count: 1e-11 of
# each value, grown over 6 plain-SGD steps (no Adam to amplify noise on near-zero gradients); 1e-9 bounds it.
REL = 1e-9


def _model(folder, tokenizer, family: str):
    """A 3-layer BERT, RoBERTa, XLM-R or ModernBERT (global and 4-position sliding-window layers) whose every
    weight comes from numpy's PCG64 stream (stable across versions)."""
    from transformers import (BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM, RobertaConfig,
                              RobertaForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM)

    if family in ("roberta", "xlm-roberta"):
        cls, cfg = (RobertaForMaskedLM, RobertaConfig) if family == "roberta" else (XLMRobertaForMaskedLM,
                                                                                     XLMRobertaConfig)
        config = cfg(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = cls(config).to(torch.float64)
    elif family == "bert":
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        model = BertForMaskedLM(config).to(torch.float64)
    else:
        config = ModernBertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, local_attention=8,
                                  global_attn_every_n_layers=2, pad_token_id=tokenizer.pad_token_id,
                                  cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                                  bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
        model = ModernBertForMaskedLM(config).to(torch.float64)
    rng = np.random.default_rng(20221207)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "norm." in name:
                param.copy_(torch.from_numpy(1.0 + 0.1 * rng.standard_normal(param.shape)) if name.endswith("weight")
                            else torch.from_numpy(0.1 * rng.standard_normal(param.shape)))
            else:
                param.copy_(torch.from_numpy(0.05 * rng.standard_normal(param.shape)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _data(folder, tokenizer):
    """48 documents of 2-5 spans of real vocabulary ids (words and their continuations), reference format."""
    vocab = tokenizer.get_vocab()
    words = np.array(sorted(i for t, i in vocab.items() if t.isalpha() and 1000 <= i < 30000))
    pieces = np.array(sorted(i for t, i in vocab.items() if t.startswith("##") and t[2:].isalpha()))
    rng = np.random.default_rng(7)
    folder.mkdir()
    with open(folder / "part.json", "w") as fh:
        for _ in range(48):
            spans = []
            for _ in range(rng.integers(2, 6)):
                ids = []
                while len(ids) < rng.integers(6, 40):
                    ids.append(int(rng.choice(words)))
                    ids += [int(p) for p in rng.choice(pieces, rng.integers(0, 3))]
                spans.append(ids)
            fh.write(json.dumps({"spans": spans}) + "\n")
    return folder


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "modernbert"])
def test_the_golden_trace(tmp_path, tokenizer, family):
    model, data = _model(tmp_path / "model", tokenizer, family), _data(tmp_path / "data", tokenizer)
    out = tmp_path / "run"
    subprocess.run([sys.executable, "coco_accel/train.py", "--output_dir", str(out), "--model_name_or_path", model,
                    "--train_dir", str(data), "--per_device_train_batch_size", "16", "--max_steps", "6",
                    "--logging_steps", "1", "--save_steps", "0", "--skip_from", "2", "--late_mlm", "--optimizer", "sgd",
                    "--learning_rate", "0.3", "--max_grad_norm", "1e9", "--max_seq_length", "32",
                    "--report_to", "none", "--seed", "5"], cwd=REPO, env=train_env(), check=True, timeout=600)
    trace = [{k: r[k] for k in ("step", *KEYS)} for r in metrics(out)]
    assert len(trace) == 6
    if os.environ.get("COCO_ACCEL_UPDATE_GOLDEN") == "1":
        GOLDEN[family].write_text(json.dumps(trace, indent=1) + "\n")
    golden = json.loads(GOLDEN[family].read_text())
    assert [r["step"] for r in trace] == [r["step"] for r in golden]
    for got, want in zip(trace, golden):
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=REL, abs=1e-12), f"step {want['step']} {key}"
    assert len({r["loss"] for r in golden}) == 6, "the steps must move the loss, or the trace pins little"
