"""`python -m coco_accel.evaluation --model FOLDER --data BEIR_FOLDER ...` (also `coco-evaluate`): zero-shot
retrieval of a model folder on BEIR folders, nDCG@10, Recall@100 and MRR@10 by trec_eval's code.

Protocol (COCO-DR's, coco_accel/evaluation/retrieval.py): queries cut at 64 tokens, documents (title and
text) at 128, last-layer CLS scored by dot product; only judged queries are evaluated, and a document is
not retrieved for the query that has its id (--keep_identical_ids turns that off).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from coco_accel.common.files import output_file_problem
from coco_accel.evaluation.beir import EvalError

logger = logging.getLogger("coco_accel.evaluation")


def _check_arguments(args) -> None:
    for flag, value, least in (("--batch_size", args.batch_size, 1), ("--chunk_docs", args.chunk_docs, 1),
                               ("--query_max_len", args.query_max_len, 3), ("--doc_max_len", args.doc_max_len, 3)):
        if value < least:
            raise EvalError(f"{flag} must be at least {least}, got {value}.")
    problem = output_file_problem("--output", args.output) if args.output else None
    if problem:
        raise EvalError(problem)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m coco_accel.evaluation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model folder (an export, a Condenser/COCO-DR checkpoint, a BERT).")
    p.add_argument("--data", required=True, nargs="+", help="BEIR dataset folders.")
    p.add_argument("--split", default="test")
    p.add_argument("--query_max_len", type=int, default=64)
    p.add_argument("--doc_max_len", type=int, default=128)
    p.add_argument("--pooling", choices=("cls", "mean"), default="cls")
    p.add_argument("--score", choices=("dot", "cos"), default="dot")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--chunk_docs", type=int, default=50_000, help="Documents encoded and scored at a time.")
    p.add_argument("--keep_identical_ids", action="store_true", help="Let a query retrieve the document with its id.")
    p.add_argument("--bf16", action="store_true", help="Encode under bf16 autocast on GPU (faster; fp32 by default).")
    p.add_argument("--output", default=None, help="Write the results (with per-query metrics) to this JSON file.")
    args = p.parse_args(argv)
    try:
        _check_arguments(args)
        from coco_accel.evaluation import retrieval  # torch: after --help and the arguments' checks

        results = retrieval.evaluate(args.model, args.data, split=args.split, query_max_len=args.query_max_len,
                                     doc_max_len=args.doc_max_len, pooling=args.pooling, score=args.score,
                                     batch_size=args.batch_size, chunk_docs=args.chunk_docs,
                                     keep_identical_ids=args.keep_identical_ids, bf16=args.bf16)
    except EvalError as err:
        logger.error("%s", err)
        return 2
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    sys.stdout.write(retrieval.markdown_table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
