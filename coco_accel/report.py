"""`python -m coco_accel.report RUN_DIR`: metrics.jsonl (+ evaluation JSON) -> report.png and report.md."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from coco_accel.common.files import json_lines

logger = logging.getLogger("coco_accel.report")


class ReportError(ValueError):
    """Report input that cannot be used; the message names the file (and line) and the fix."""


TRAIN_KEYS = ("step", "loss", "mlm_head", "mlm_backbone", "contrastive", "contrastive_acc")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records) from metrics.jsonl; a line that is not one of them is an error."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: {'a file' if run_dir.exists() else 'no such folder'}; pass the --output_dir "
                          "of a training run.")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl; pass the --output_dir of a training run.")
    train, heldout = [], []
    for n, record, line in json_lines(path, ReportError):
        if isinstance(record, dict) and "loss" in record and all(k in record for k in TRAIN_KEYS):
            train.append(record)
        elif isinstance(record, dict) and "step" in record and any(k.startswith(("heldout/", "eval/")) for k in record):
            heldout.append(record)
        else:
            raise ReportError(f"{path}:{n}: neither a training record (with {', '.join(TRAIN_KEYS)}) nor a held-out "
                              f"one (step and heldout/...): {line.strip()[:80]!r}.")
    if not train:
        raise ReportError(f"{path}: no training record yet (the first is written at step 1).")
    return train, heldout


def read_evaluation(path: Path, flag: str, given: bool) -> Optional[dict]:
    """A `python -m coco_accel.evaluation --output` JSON; None when the default file is absent, an error when a given one is."""
    if not path.is_file():
        if given:
            raise ReportError(f"{flag} {path}: no such file (write it with `python -m coco_accel.evaluation ... --output`).")
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{flag} {path}: not JSON ({err}).") from None
    if not isinstance(result, dict) or not isinstance(result.get("datasets"), dict) or "average" not in result:
        raise ReportError(f"{flag} {path}: not a `coco_accel.evaluation` result (no 'datasets' and 'average').")
    return result


def _corpora(heldout: list[dict]) -> list[str]:
    return sorted({k.split("/")[1] for r in heldout for k in r if k.startswith("heldout/") and k.endswith("/contrastive")})


def _collections(records: list[dict]) -> list[str]:
    """The --eval_data collections of the evaluation records (keys eval/<name>/ndcg@10)."""
    return sorted({k.split("/")[1] for r in records for k in r if k.startswith("eval/") and k.endswith("/ndcg@10")})


def plot(train: list[dict], heldout: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    collections = _collections(heldout)
    panels = 2 + bool(_corpora(heldout)) + bool(collections)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    steps = [r["step"] for r in train]
    for part in ("mlm_head", "mlm_backbone", "contrastive", "loss"):
        axes[0].plot(steps, [r[part] for r in train], label=part)
    axes[0].set(title="training loss parts", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["contrastive_acc"] for r in train], label="training batches")
    for corpus in _corpora(heldout):
        rows = [r for r in heldout if f"heldout/{corpus}/contrastive_acc" in r]
        axes[1].plot([r["step"] for r in rows], [r[f"heldout/{corpus}/contrastive_acc"] for r in rows],
                     linestyle="--", marker="o", label=f"held-out {corpus}")
        axes[2].plot([r["step"] for r in rows], [r[f"heldout/{corpus}/contrastive"] for r in rows], marker="o",
                     label=corpus)
    axes[1].set(title="sibling-span accuracy", xlabel="step", ylim=(0, 1))
    axes[1].legend()
    if _corpora(heldout):
        axes[2].set(title="held-out contrastive loss per corpus", xlabel="step")
        axes[2].legend()
    if collections:
        for name in collections:
            rows = [r for r in heldout if f"eval/{name}/ndcg@10" in r]
            axes[-1].plot([r["step"] for r in rows], [r[f"eval/{name}/ndcg@10"] for r in rows], marker="o", label=name)
        axes[-1].set(title="zero-shot nDCG@10 (--eval_data)", xlabel="step")
        axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(run_dir: Path, train: list[dict], heldout: list[dict], before: Optional[dict], after: Optional[dict]) -> str:
    lines = [f"# Pretraining report: {run_dir.name}", ""]
    if train:
        a, b = train[0], train[-1]
        lines += ["| | step | loss | mlm_head | mlm_backbone | contrastive | contrastive_acc |", "|---|---|---|---|---|---|---|"]
        for label, r in (("first", a), ("last", b)):
            lines.append(f"| {label} | {r['step']} | {r['loss']:.4f} | {r['mlm_head']:.4f} | {r['mlm_backbone']:.4f} | "
                         f"{r['contrastive']:.4f} | {r['contrastive_acc']:.3f} |")
        lines.append("")
    if _corpora(heldout):
        lines += ["## Held-out contrastive loss per corpus", "",
                  "| corpus | first (step) | last (step) | drop | accuracy first -> last |", "|---|---|---|---|---|"]
        for corpus in _corpora(heldout):
            rows = [r for r in heldout if f"heldout/{corpus}/contrastive" in r]
            f, l = rows[0], rows[-1]
            key, acc = f"heldout/{corpus}/contrastive", f"heldout/{corpus}/contrastive_acc"
            lines.append(f"| {corpus} | {f[key]:.4f} ({f['step']}) | {l[key]:.4f} ({l['step']}) | {f[key] - l[key]:+.4f} | "
                         f"{f[acc]:.3f} -> {l[acc]:.3f} |")
        lines.append("")
    if _collections(heldout):
        lines += ["## Retrieval during training (--eval_data)", "",
                  "| dataset | metric | first (step) | last (step) | change |", "|---|---|---|---|---|"]
        for name in _collections(heldout):
            rows = [r for r in heldout if f"eval/{name}/ndcg@10" in r]
            f, l = rows[0], rows[-1]
            for metric in ("ndcg@10", "recall@100", "mrr@10"):
                key = f"eval/{name}/{metric}"
                lines.append(f"| {name} | {metric} | {f[key]:.4f} ({f['step']}) | {l[key]:.4f} ({l['step']}) | "
                             f"{l[key] - f[key]:+.4f} |")
        lines.append("")
    if before or after:
        lines += ["## Zero-shot retrieval", "", "| dataset | model | nDCG@10 | Recall@100 | MRR@10 |", "|---|---|---|---|---|"]
        names = sorted(set((before or {}).get("datasets", {})) | set((after or {}).get("datasets", {})))
        for name in names + ["average"]:
            for label, res in (("before", before), ("after", after)):
                if not res:
                    continue
                r = res["average"] if name == "average" else res["datasets"].get(name)
                if r:
                    lines.append(f"| {name} | {label} | {r['ndcg@10']:.4f} | {r['recall@100']:.4f} | {r['mrr@10']:.4f} |")
        lines.append("")
    lines.append("![loss parts and held-out signals](report.png)")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m coco_accel.report", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--before", default=None, help="`coco_accel.evaluation` JSON of the warm start (default: RUN_DIR/eval_before.json)")
    p.add_argument("--after", default=None, help="`coco_accel.evaluation` JSON of the export (default: RUN_DIR/eval_after.json)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        train, heldout = read_metrics(run_dir)
        evals = [read_evaluation(Path(given) if given else run_dir / default, flag, given is not None)
                 for given, default, flag in ((args.before, "eval_before.json", "--before"),
                                              (args.after, "eval_after.json", "--after"))]
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise ReportError(f"{run_dir}: not writable; the report is written beside metrics.jsonl.")
    except ReportError as err:
        logger.error("%s", err)
        return 2
    plot(train, heldout, run_dir / "report.png")
    (run_dir / "report.md").write_text(summary(run_dir, train, heldout, *evals))
    logger.info("Report: %s and %s", run_dir / "report.md", run_dir / "report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
