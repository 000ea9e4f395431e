"""`python -m coco_accel.report RUN_DIR`: metrics.jsonl (+ evaluation JSON) -> report.png and report.md."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger("coco_accel.report")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records) from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl; pass the --output_dir of a training run.")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if any(k.startswith("heldout/") for k in r)]


def _corpora(heldout: list[dict]) -> list[str]:
    return sorted({k.split("/")[1] for r in heldout for k in r if k.endswith("/contrastive")})


def plot(train: list[dict], heldout: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if heldout else 2
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
    if heldout:
        axes[2].set(title="held-out contrastive loss per corpus", xlabel="step")
        axes[2].legend()
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
    if heldout:
        lines += ["## Held-out contrastive loss per corpus", "",
                  "| corpus | first (step) | last (step) | drop | accuracy first -> last |", "|---|---|---|---|---|"]
        for corpus in _corpora(heldout):
            rows = [r for r in heldout if f"heldout/{corpus}/contrastive" in r]
            f, l = rows[0], rows[-1]
            key, acc = f"heldout/{corpus}/contrastive", f"heldout/{corpus}/contrastive_acc"
            lines.append(f"| {corpus} | {f[key]:.4f} ({f['step']}) | {l[key]:.4f} ({l['step']}) | {f[key] - l[key]:+.4f} | "
                         f"{f[acc]:.3f} -> {l[acc]:.3f} |")
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
    p.add_argument("--before", default=None, help="evaluate.py JSON of the warm start (default: RUN_DIR/eval_before.json)")
    p.add_argument("--after", default=None, help="evaluate.py JSON of the export (default: RUN_DIR/eval_after.json)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        train, heldout = read_metrics(run_dir)
    except FileNotFoundError as err:
        logger.error("%s", err)
        return 2
    evals = []
    for given, default in ((args.before, "eval_before.json"), (args.after, "eval_after.json")):
        path = Path(given) if given else run_dir / default
        evals.append(json.loads(path.read_text()) if path.is_file() else None)
    plot(train, heldout, run_dir / "report.png")
    (run_dir / "report.md").write_text(summary(run_dir, train, heldout, *evals))
    logger.info("Report: %s and %s", run_dir / "report.md", run_dir / "report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
