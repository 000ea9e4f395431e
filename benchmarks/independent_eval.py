"""The experiment's numbers recomputed by a second evaluator that shares no code with coco_accel.evaluation.retrieval.

For each model folder, the queries and documents of a BEIR folder are read here with json/csv, encoded by
sentence-transformers (a Transformer module and CLS pooling, no normalisation: the COCO-DR protocol), scored
against the whole corpus at once, and ranked; nDCG@10 (linear gain, as trec_eval), Recall@100 and MRR@10
are computed here from the qrels. Each is compared with the evaluation JSON coco_accel wrote for that model.

    python benchmarks/independent_eval.py --data runs/manpages \\
        --pair runs/exp/runs/target_manpages/seed1 runs/exp/eval/target_manpages_seed1.json ...

Vectors differ from coco_accel's by float32 rounding only (other padding per batch), so a query's ranking
can change only where two documents' scores tie to ~1e-5; the table counts such queries.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

QUERY_TOKENS, DOC_TOKENS = 64, 128  # the COCO-DR protocol's cuts


def read_folder(folder: Path, split: str):
    corpus = {}
    with open(folder / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                doc = json.loads(line)
                corpus[str(doc["_id"])] = f"{(doc.get('title') or '').strip()} {(doc.get('text') or '').strip()}".strip()
    qrels: dict[str, dict[str, int]] = {}
    with open(folder / "qrels" / f"{split}.tsv", encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if row and row[0] != "query-id":
                qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
    queries = {}
    with open(folder / "queries.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                q = json.loads(line)
                if str(q["_id"]) in qrels:
                    queries[str(q["_id"])] = q["text"]
    return corpus, queries, qrels


def metrics_of(ranked: list[str], judged: dict[str, int]) -> dict[str, float]:
    gains = [judged.get(d, 0) for d in ranked]
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:10]))
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:10]))
    relevant = sum(1 for g in judged.values() if g > 0)
    first = next((i for i, g in enumerate(gains[:10]) if g > 0), None)
    return {"ndcg@10": dcg / idcg if idcg else 0.0,
            "recall@100": sum(1 for g in gains[:100] if g > 0) / relevant if relevant else 0.0,
            "mrr@10": 1.0 / (first + 1) if first is not None else 0.0}


def evaluate(model_dir: str, corpus: dict, queries: dict, qrels: dict) -> dict[str, dict[str, float]]:
    from sentence_transformers import SentenceTransformer, models

    # built here rather than from the folder's modules.json, so a warm start with its own pooling (MiniLM's
    # mean + normalise) is measured under the same protocol as the exports
    backbone = models.Transformer(model_dir, max_seq_length=DOC_TOKENS)
    pooling = models.Pooling(backbone.get_word_embedding_dimension(), pooling_mode="cls")
    model = SentenceTransformer(modules=[backbone, pooling], device="cpu")
    doc_ids, query_ids = list(corpus), list(queries)
    docs = model.encode([corpus[d] for d in doc_ids], batch_size=64, convert_to_tensor=True)
    model.max_seq_length = QUERY_TOKENS
    qvecs = model.encode([queries[q] for q in query_ids], batch_size=64, convert_to_tensor=True)
    scores = (qvecs @ docs.T).numpy()
    position = {d: i for i, d in enumerate(doc_ids)}
    per_query = {}
    for row, qid in enumerate(query_ids):
        if qid in position:  # BEIR does not retrieve a document with the query's own id
            scores[row, position[qid]] = -np.inf
        top = np.argsort(-scores[row], kind="stable")[:100]
        per_query[qid] = metrics_of([doc_ids[i] for i in top], qrels[qid])
        per_query[qid]["top3"] = [(doc_ids[i], round(float(scores[row, i]), 6)) for i in top[:3]]
    return per_query


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the BEIR folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("MODEL", "EVAL_JSON"), required=True,
                        help="a model folder and the coco_accel.evaluation.retrieval JSON written for it")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    corpus, queries, qrels = read_folder(args.data, args.split)
    name = args.data.name
    print("| evaluation | metric | coco_accel.evaluation.retrieval | independent | queries that differ |")
    print("|---|---|---|---|---|")
    summary, notes = [], []
    for model_dir, eval_json in args.pair:
        ours = json.loads(Path(eval_json).read_text())["datasets"][name]
        theirs = evaluate(model_dir, corpus, queries, qrels)
        label = Path(eval_json).stem
        assert set(theirs) == set(ours["per_query"]), "the two evaluators count different queries"
        for metric in ("ndcg@10", "recall@100", "mrr@10"):
            mean = float(np.mean([m[metric] for m in theirs.values()]))
            differing = [q for q in theirs if abs(theirs[q][metric] - ours["per_query"][q][metric]) > 1e-9]
            notes += [f"{label} {q} {metric}: coco_accel {ours['per_query'][q][metric]:.4f}, independent "
                      f"{theirs[q][metric]:.4f}; scores of its top 3 here: {theirs[q]['top3']}" for q in differing]
            print(f"| {label} | {metric} | {ours[metric]:.4f} | {mean:.4f} | {len(differing)} of {len(theirs)} |")
            summary.append({"evaluation": label, "metric": metric, "ours": ours[metric], "independent": mean,
                            "queries_differing": len(differing)})
    for line in notes:
        print(line)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
