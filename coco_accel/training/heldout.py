"""Held-out contrastive signal per corpus: loss and sibling-span accuracy on documents never trained on.

COCO-DR's analysis ties the per-corpus drop of this loss to the retrieval gain, so it is the cheap
training-time proxy for "pretraining is working on this corpus". Batches are fixed once (epoch 0,
no masking), scored without dropout in the same global-batch size as training, and exact across
any number of processes (each scores its slice against the gathered batch).
"""

from __future__ import annotations

import numpy as np
import torch

from coco_accel.common import dist
from coco_accel.training.batches import Batch, BatchPlan, SpanCollator
from coco_accel.training.losses import span_contrastive_loss
from coco_accel.training.span_store import fetch_spans


def heldout_batches(dataset, collator: SpanCollator, plan: BatchPlan, max_docs: int) -> dict[str, list[Batch]]:
    """Per corpus: this process's slices of fixed global batches over up to `max_docs` held-out documents."""
    corpora = np.asarray(dataset.with_format("arrow")[:].column("corpus").to_numpy(zero_copy_only=False))
    out: dict[str, list[Batch]] = {}
    for corpus in sorted(set(corpora.tolist())):
        docs = np.nonzero(corpora == corpus)[0][:max_docs]
        batches = []
        for start in range(0, len(docs), plan.global_docs):
            chunk = docs[start:start + plan.global_docs]
            if len(chunk) < max(2, plan.world_size):
                continue  # too few documents to give every process one and every span a negative
            mine = chunk[plan.local_slice(len(chunk))]
            batches.append(Batch.of(collator(0, mine, *fetch_spans(dataset, mine), mask=False), 0,
                                    plan.shares(len(chunk))))
        if batches:
            out[corpus] = batches
    return out


@torch.no_grad()
def heldout_signal(model, batches: dict[str, list[Batch]], device, *, temperature: float = 1.0,
                   normalize: bool = False) -> dict[str, float]:
    """{'heldout/<corpus>/contrastive': mean loss, '.../contrastive_acc': accuracy} over each corpus."""
    was_training = model.training
    model.eval()
    record = {}
    for corpus, corpus_batches in batches.items():
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, spans
        for batch in corpus_batches:
            b = {k: v.to(device) for k, v in batch.tensors.items()}
            cls = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                        layout=batch.layout, cls_only=True).cls
            columns, offset = dist.gather_with_grad(cls, batch.row_counts)
            loss, correct = span_contrastive_loss(cls, columns, row_offset=offset, normalizer=1.0,
                                                  temperature=temperature, normalize=normalize)
            sums += torch.stack([loss.double(), correct.double(), torch.tensor(cls.shape[0], device=device).double()])
        total = dist.all_reduce_sum(sums).tolist()
        record[f"heldout/{corpus}/contrastive"] = total[0] / max(total[2], 1)
        record[f"heldout/{corpus}/contrastive_acc"] = total[1] / max(total[2], 1)
    model.train(was_training)
    return record
