"""Zero-shot retrieval on BEIR-format data: encode, exact search in bounded memory, trec_eval metrics.

Protocol (COCO-DR's): queries cut at 64 tokens, documents (title and text joined by a space) at
128; the last layer's CLS vector scored by dot product; nDCG@10, Recall@100 and MRR@10 computed by
pytrec_eval (trec_eval's own code). As in BEIR, only queries with judgements in the split are
evaluated (the others are counted and reported), and a document whose id equals the query's is
not retrieved for it (`--keep_identical_ids` turns that off).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from coco_accel.common.tokenizer_files import tokenizer_folder_problem
from coco_accel.evaluation.beir import EvalError, check_beir_folder, load_beir

logger = logging.getLogger("coco_accel.evaluation.retrieval")

METRICS = ("ndcg@10", "recall@100", "mrr@10")


# ---------------------------------------------------------------------------------------------------------
# encoding and search


class Encoder:
    """An HF encoder folder -> pooled vectors, batched, on the GPU when there is one."""

    def __init__(self, model_dir: str, *, pooling: str = "cls", device: Optional[str] = None, batch_size: int = 128,
                 bf16: bool = False):
        from transformers import AutoModel, AutoTokenizer


        folder = Path(model_dir)
        if not folder.is_dir():
            raise EvalError(f"--model {model_dir}: {'a file' if folder.exists() else 'no such folder'}; pass a local HF "
                            "model folder (e.g. a training run's --output_dir).")
        if not (folder / "config.json").is_file():
            raise EvalError(f"--model {model_dir}: no config.json; pass a local HF model folder (e.g. a training "
                            "run's --output_dir).")
        problem = tokenizer_folder_problem(model_dir)
        if problem:
            raise EvalError(f"--model {model_dir}: {problem}; the evaluator reads the tokenizer from the model "
                            "folder (tokenizer.save_pretrained there).")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).to(self.device).eval()
        self.pooling = pooling
        self.batch_size = batch_size
        self.bf16 = bf16 and self.device.type == "cuda"  # off by default: numbers comparable to fp32 tools

    @classmethod
    def of_model(cls, model, tokenizer, pooling: str = "cls", batch_size: int = 128) -> "Encoder":
        """An encoder over a model already in memory (a training run's backbone), on its device, in fp32."""
        encoder = cls.__new__(cls)
        encoder.model, encoder.tokenizer, encoder.pooling, encoder.batch_size = model, tokenizer, pooling, batch_size
        encoder.device = next(model.parameters()).device
        encoder.bf16 = False
        return encoder

    @torch.no_grad()
    def encode(self, texts: list[str], max_len: int) -> torch.Tensor:
        """[len(texts), H] pooled vectors, in the order of `texts`."""
        out = torch.zeros(len(texts), self.model.config.hidden_size, device=self.device)
        rows, vectors = self.encode_share(texts, max_len)
        out[rows] = vectors
        return out

    @torch.no_grad()
    def encode_share(self, texts: list[str], max_len: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions in `texts`, pooled vectors) of this process's share of the batches.

        Texts are encoded longest first, so that each batch holds texts of about one length and pads
        little (in corpus order a batch pads to its longest). Batch b goes to process b mod world, so
        every batch is the one a single process would encode, and its vectors are the same.
        """
        hidden_size = self.model.config.hidden_size
        if not texts:
            return torch.zeros(0, dtype=torch.long, device=self.device), torch.zeros(0, hidden_size, device=self.device)
        tokens = self.tokenizer(texts, max_length=max_len, truncation=True)
        order = sorted(range(len(texts)), key=lambda i: -len(tokens["input_ids"][i]))
        rows_out, vectors = [], []
        for b, start in enumerate(range(0, len(texts), self.batch_size)):
            if b % world != rank:
                continue
            rows = order[start:start + self.batch_size]
            enc = self.tokenizer.pad({k: [v[i] for i in rows] for k, v in tokens.items()},
                                     return_tensors="pt").to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                hidden = self.model(**enc).last_hidden_state
            if self.pooling == "cls":
                vec = hidden[:, 0]
            else:
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            rows_out += rows
            vectors.append(vec.float())
        if not vectors:
            return torch.zeros(0, dtype=torch.long, device=self.device), torch.zeros(0, hidden_size, device=self.device)
        return torch.tensor(rows_out, device=self.device), torch.cat(vectors)


def exact_search(queries: torch.Tensor, doc_chunks: Iterator, k: int,
                 score: str = "dot") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k documents per query over streamed chunks of document vectors.

    A chunk is a [n, H] tensor of the next n documents in corpus order, or (corpus positions [n],
    vectors [n, H]) for any subset (a process's share). Memory holds the queries, one chunk and a
    running top-k, never a queries x corpus matrix. Returns (scores [Q, k'], corpus positions [Q, k'])
    with k' = min(k, documents seen), best first.
    """
    if score == "cos":
        queries = torch.nn.functional.normalize(queries, dim=-1)
    n_q = queries.shape[0]
    best_scores = torch.zeros((n_q, 0), device=queries.device)
    best_pos = torch.zeros((n_q, 0), dtype=torch.long, device=queries.device)
    offset = 0
    for chunk in doc_chunks:
        if isinstance(chunk, tuple):
            positions, vecs = chunk
        else:
            vecs = chunk
            positions = torch.arange(offset, offset + vecs.shape[0], device=queries.device)
            offset += vecs.shape[0]
        if vecs.shape[0] == 0:
            continue
        if score == "cos":
            vecs = torch.nn.functional.normalize(vecs, dim=-1)
        scores = torch.cat([best_scores, queries @ vecs.T], dim=1)
        pos = torch.cat([best_pos, positions.to(queries.device).expand(n_q, -1)], dim=1)
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        best_scores, best_pos = top.values, torch.gather(pos, 1, top.indices)
    return best_scores, best_pos


def merge_top(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of candidate lists (scores, positions [Q, m]; position -1 for none), best first, ties
    to the lower corpus position: the same whatever order the candidates come in."""
    scores = torch.where(positions < 0, torch.full_like(scores, float("-inf")), scores)
    by_position = torch.argsort(positions, dim=1, stable=True)
    scores, positions = torch.gather(scores, 1, by_position), torch.gather(positions, 1, by_position)
    best = torch.argsort(-scores, dim=1, stable=True)[:, :k]
    scores, positions = torch.gather(scores, 1, best), torch.gather(positions, 1, best)
    keep = int((positions >= 0).sum(dim=1).max().item()) if positions.numel() else 0
    return scores[:, :keep], positions[:, :keep]


# ---------------------------------------------------------------------------------------------------------
# metrics


def trec_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per query nDCG@10, Recall@100 and MRR@10, by pytrec_eval (trec_eval's implementation)."""
    import pytrec_eval

    main = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    top10 = {q: dict(sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))[:10]) for q, docs in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    out = {}
    for q in qrels:
        m = main.get(q, {})
        out[q] = {"ndcg@10": m.get("ndcg_cut_10", 0.0), "recall@100": m.get("recall_100", 0.0),
                  "mrr@10": rr.get(q, {}).get("recip_rank", 0.0)}
    return out


def evaluate_dataset(encoder: Encoder, folder: str, *, split: str = "test", query_max_len: int = 64,
                     doc_max_len: int = 128, score: str = "dot", chunk_docs: int = 50_000,
                     keep_identical_ids: bool = False) -> dict:
    queries, corpus, qrels, left_out = load_beir(folder, split)
    return score_collection(encoder, queries, corpus, qrels, left_out, query_max_len=query_max_len,
                            doc_max_len=doc_max_len, score=score, chunk_docs=chunk_docs,
                            keep_identical_ids=keep_identical_ids, name=Path(folder).name)


def score_collection(encoder: Encoder, queries: dict[str, str], corpus: dict[str, str], qrels: dict, left_out: dict,
                     *, query_max_len: int, doc_max_len: int, score: str, chunk_docs: int, keep_identical_ids: bool,
                     name: str, rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """Metrics of one loaded collection. With world > 1 every process encodes every query and its share of
    each corpus chunk's batches (process b mod world encodes batch b, as one process would), searches it,
    and the top lists are merged exactly: the result is the single process's, on every process."""
    from tqdm.auto import tqdm

    from coco_accel.common import dist

    qids = list(queries)
    qvecs = encoder.encode([queries[q] for q in qids], query_max_len)
    doc_ids = list(corpus)

    def chunks():
        for start in tqdm(range(0, len(doc_ids), chunk_docs), desc=f"{name}: corpus", unit="chunk",
                          disable=not progress):
            rows, vecs = encoder.encode_share([corpus[d] for d in doc_ids[start:start + chunk_docs]], doc_max_len,
                                              rank, world)
            yield rows + start, vecs

    k = 100 if keep_identical_ids else 101
    scores, ranked = exact_search(qvecs, chunks(), k, score)
    if world > 1:  # every process's top list, padded to k (position -1: none), then the top k of them all
        pad = k - scores.shape[1]
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
        ranked = torch.nn.functional.pad(ranked, (0, pad), value=-1)
        scores, ranked = torch.cat(dist.all_gather_equal(scores), dim=1), torch.cat(dist.all_gather_equal(ranked), dim=1)
    scores, ranked = merge_top(scores, ranked, k)
    run = {}
    for q, row_scores, row_pos in zip(qids, scores.tolist(), ranked.tolist()):
        hits = {doc_ids[i]: s for i, s in zip(row_pos, row_scores) if i >= 0 and (keep_identical_ids or doc_ids[i] != q)}
        run[q] = dict(sorted(hits.items(), key=lambda kv: -kv[1])[:100])
    per_query = trec_metrics(qrels, run)
    result = {m: sum(v[m] for v in per_query.values()) / max(len(per_query), 1) for m in METRICS}
    result.update({"queries": len(per_query), **left_out, "documents": len(corpus), "per_query": per_query})
    return result


def markdown_table(results: dict) -> str:
    lines = ["| dataset | nDCG@10 | Recall@100 | MRR@10 | queries |", "|---|---|---|---|---|"]
    for name, r in results["datasets"].items():
        lines.append(f"| {name} | {r['ndcg@10']:.4f} | {r['recall@100']:.4f} | {r['mrr@10']:.4f} | {r['queries']} |")
    a = results["average"]
    lines.append(f"| **average** | {a['ndcg@10']:.4f} | {a['recall@100']:.4f} | {a['mrr@10']:.4f} | |")
    return "\n".join(lines)


def evaluate(model: str, data: Sequence[str], *, split: str = "test", query_max_len: int = 64, doc_max_len: int = 128,
             pooling: str = "cls", score: str = "dot", batch_size: int = 128, chunk_docs: int = 50_000,
             keep_identical_ids: bool = False, bf16: bool = False) -> dict:
    for folder in data:  # every folder before the model loads: not a missing one after an hour of encoding
        check_beir_folder(folder, split)
    encoder = Encoder(model, pooling=pooling, batch_size=batch_size, bf16=bf16)
    positions = getattr(encoder.model.config, "max_position_embeddings", None)
    for flag, length in (("--query_max_len", query_max_len), ("--doc_max_len", doc_max_len)):
        if positions and length > positions:
            raise EvalError(f"{flag} {length} is longer than the model's {positions} positions: lower it.")
    datasets = {}
    for folder in data:
        name = Path(folder).name
        logger.info("Evaluating %s on %s (%s split)", model, name, split)
        datasets[name] = evaluate_dataset(encoder, folder, split=split, query_max_len=query_max_len,
                                          doc_max_len=doc_max_len, score=score, chunk_docs=chunk_docs,
                                          keep_identical_ids=keep_identical_ids)
    average = {m: sum(d[m] for d in datasets.values()) / len(datasets) for m in METRICS}
    return {"model": str(model), "split": split,
            "protocol": {"query_max_len": query_max_len, "doc_max_len": doc_max_len, "pooling": pooling,
                         "score": score, "identical_ids_removed": not keep_identical_ids,
                         "precision": "bf16" if encoder.bf16 else "fp32"},
            "datasets": datasets, "average": average}


# ---------------------------------------------------------------------------------------------------------
# during training


class TrainingEvaluation:
    """Zero-shot retrieval of the model being trained, on BEIR folders read once at start-up.

    Scored as `python -m coco_accel.evaluation` scores the export (same protocol, same code, fp32 on the
    model's device), with the corpus encoding shared by the processes and the results merged exactly.
    Returns metrics.jsonl keys `eval/<dataset>/ndcg@10`, `.../recall@100`, `.../mrr@10`, and
    `eval/seconds`.
    """

    def __init__(self, folders: Sequence[str], split: str = "test", *, query_max_len: int = 64, doc_max_len: int = 128,
                 pooling: str = "cls", score: str = "dot", batch_size: int = 128, chunk_docs: int = 50_000):
        names = [Path(f).name for f in folders]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise EvalError(f"--eval_data: two folders are named {repeated[0]}; metrics are keyed by folder name, so "
                            "give each collection a distinct one.")
        for folder in folders:
            check_beir_folder(folder, split, flag="--eval_data")
        self.collections = {name: load_beir(folder, split) for name, folder in zip(names, folders)}
        self.settings = {"query_max_len": query_max_len, "doc_max_len": doc_max_len, "score": score,
                         "chunk_docs": chunk_docs, "keep_identical_ids": False}
        self.pooling, self.batch_size = pooling, batch_size

    @torch.no_grad()
    def __call__(self, backbone, tokenizer, rank: int = 0, world: int = 1) -> dict[str, float]:
        """Every collection's metrics with `backbone` (an HF base model: what AutoModel loads from the export)."""
        start = time.perf_counter()
        was_training = backbone.training
        backbone.eval()
        encoder = Encoder.of_model(backbone, tokenizer, pooling=self.pooling, batch_size=self.batch_size)
        record = {}
        for name, (queries, corpus, qrels, left_out) in self.collections.items():
            result = score_collection(encoder, queries, corpus, qrels, left_out, name=name, rank=rank, world=world,
                                      progress=False, **self.settings)
            record.update({f"eval/{name}/{m}": result[m] for m in METRICS})
        backbone.train(was_training)
        record["eval/seconds"] = time.perf_counter() - start
        return record
