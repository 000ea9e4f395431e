"""`python -m coco_accel.experiment`: does pretraining on the target corpus help? The paper's ablation, one command.

From one warm start, for each target BEIR folder: pretrain (a) on that target's own corpus and (b) on a
control corpus (the same control run serves every target), for each seed; evaluate the warm start and
every trained model on every target with `coco_accel.evaluation.retrieval`; then a table of nDCG@10 / Recall@100 /
MRR@10 (mean and spread over seeds), paired randomisation tests over queries on per-query nDCG@10 (each
arm against the warm start, and target against control; per seed and on the seed-averaged per-query
values), and a plot. With `--report_fraction`, a keyed share of each target's queries is set aside and
reported separately, so a recipe chosen on the other queries is judged on queries it never saw.

Runs use the real trainer (a subprocess per run, through `--launcher`) and the real evaluator. The command
is resumable: every finished step leaves its file (a preprocessed folder's stats.json, an export's
DONE marker, an evaluation's JSON), and the same command again skips those and continues; an
interrupted training run resumes from its last checkpoint.

    python -m coco_accel.experiment --model MODEL --targets BEIR/cisi --control docstrings \\
        --config configs/coco_small.yaml --seeds 1 2 3 --output_dir runs/coco_small
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from coco_accel.common.tokenizer_files import tokenizer_folder_problem
from coco_accel.evaluation.beir import EvalError, check_beir_folder
from coco_accel.preprocessing.docstrings import write_corpus

logger = logging.getLogger("coco_accel.experiment")

DONE = "DONE"  # written into a run folder once its export is complete
DOCSTRINGS = "docstrings"  # --control: the demo's corpus (the standard library's docstrings), written here


class ExperimentError(ValueError):
    """An experiment input that cannot be used; the message names it and the fix."""


def paired_randomisation(a: Sequence[float], b: Sequence[float], rounds: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of mean(a - b) = 0 under random sign flips of the paired differences (Fisher's
    randomisation test, as used for IR significance), with the +1 correction (never exactly 0)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0 or not np.any(d):
        return 1.0
    observed = abs(d.mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(rounds, d.size))
    flipped = np.abs((signs * d).mean(axis=1))
    return float((1 + np.sum(flipped >= observed - 1e-15)) / (1 + rounds))


def query_split(qids: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(tuning, reported) queries: a keyed share `fraction` of the ids is set aside for reporting."""
    if fraction <= 0:
        return list(qids), []
    def key(q: str) -> float:
        return int(hashlib.sha256(f"{seed}:{q}".encode()).hexdigest()[:12], 16) / 16 ** 12
    reported = [q for q in qids if key(q) < fraction]
    return [q for q in qids if key(q) >= fraction], reported


class Experiment:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.output_dir)
        self.targets = {Path(t).name: t for t in args.targets}
        self.control = args.control

    # -- steps, each skipped when its file exists ------------------------------------------------------

    def preprocess(self, name: str, source: str) -> Path:
        from coco_accel import preprocess

        folder = self.out / "data" / name
        if (folder / "stats.json").is_file():
            return folder
        logger.info("Preprocessing %s -> %s", source, folder)
        rc = preprocess.main(["--tokenizer", self.args.model, "--output_dir", str(folder), "--num_proc",
                              str(self.args.num_proc), "--cache_dir", str(self.out / "data" / ".cache"), source])
        if rc != 0:
            raise ExperimentError(f"preprocessing {source} failed (exit code {rc}); see the messages above.")
        return folder

    def train(self, arm: str, data: Path, seed: int) -> Path:
        run = self.out / "runs" / arm / f"seed{seed}"
        if (run / DONE).is_file():
            return run
        if self.args.launcher:
            cmd = shlex.split(self.args.launcher) + [str(Path(__file__).with_name("train.py"))]
        else:
            cmd = [sys.executable, "-m", "coco_accel.train"]
        cmd += ["--model_name_or_path", self.args.model, "--train_dir", str(data), "--output_dir", str(run),
                "--seed", str(seed), "--report_to", "none", "--overwrite_output_dir"]
        if self.args.config:
            cmd += ["--config", self.args.config]
        cmd += list(self.args.train_args)
        logger.info("Training %s, seed %d: %s", arm, seed, " ".join(cmd))
        rc = subprocess.call(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
        if rc != 0:
            raise ExperimentError(f"training {arm} seed {seed} failed (exit code {rc}); run the command again to "
                                  f"resume it from its last checkpoint, or see {run}.")
        (run / DONE).write_text("exported\n")
        return run

    def evaluate(self, label: str, model: str) -> dict:
        from coco_accel.evaluation.retrieval import evaluate

        path = self.out / "eval" / f"{label}.json"
        if path.is_file():
            return json.loads(path.read_text())
        logger.info("Evaluating %s on %s", label, ", ".join(self.targets))
        result = evaluate(model, list(self.targets.values()), split=self.args.split)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result) + "\n")
        return result

    # -- the whole experiment ---------------------------------------------------------------------------

    def run(self) -> dict:
        control = self.control
        if control == DOCSTRINGS:
            folder = self.out / "data" / "docstrings_corpus"
            if not (folder / "corpus.jsonl").is_file():
                write_corpus(folder)
            control = str(folder)
        control_data = self.preprocess("control", control)
        evals = {"warm start": self.evaluate("warm_start", self.args.model)}
        for seed in self.args.seeds:
            for name, folder in self.targets.items():
                data = self.preprocess(f"target_{name}", folder)
                run = self.train(f"target_{name}", data, seed)
                evals[f"target_{name}/seed{seed}"] = self.evaluate(f"target_{name}_seed{seed}", str(run))
            run = self.train("control", control_data, seed)
            evals[f"control/seed{seed}"] = self.evaluate(f"control_seed{seed}", str(run))
        summary = summarise(evals, list(self.targets), self.args.seeds, self.args.report_fraction)
        (self.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
        (self.out / "results.md").write_text(markdown(summary))
        plot(summary, self.out / "results.png")
        logger.info("Results: %s (and results.json, results.png)\n%s", self.out / "results.md", markdown(summary))
        return summary


def _per_query(result: dict, target: str, qids: Sequence[str], metric: str = "ndcg@10") -> list[float]:
    per = result["datasets"][target]["per_query"]
    return [per[q][metric] for q in qids]


def summarise(evals: dict, targets: Sequence[str], seeds: Sequence[int], report_fraction: float) -> dict:
    """Means, spreads and paired tests per target and query subset, from the evaluations' per-query metrics."""
    out: dict = {"seeds": list(seeds), "targets": {}}
    warm = evals["warm start"]
    for target in targets:
        all_q = sorted(warm["datasets"][target]["per_query"])
        tuning, reported = query_split(all_q, report_fraction)
        subsets = {"all queries": all_q}
        if reported:
            subsets.update({"tuning queries": tuning, "reported queries": reported})
        entry = {}
        for subset, qids in subsets.items():
            arms = {"target": [evals[f"target_{target}/seed{s}"] for s in seeds],
                    "control": [evals[f"control/seed{s}"] for s in seeds]}
            row = {"queries": len(qids), "warm start": {m: float(np.mean(_per_query(warm, target, qids, m)))
                                                        for m in ("ndcg@10", "recall@100", "mrr@10")}}
            base = _per_query(warm, target, qids)
            for arm, results in arms.items():
                per_seed = [{m: float(np.mean(_per_query(r, target, qids, m))) for m in ("ndcg@10", "recall@100", "mrr@10")}
                            for r in results]
                averaged = np.mean([_per_query(r, target, qids) for r in results], axis=0)
                row[arm] = {m: {"mean": float(np.mean([p[m] for p in per_seed])),
                                "std": float(np.std([p[m] for p in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0}
                            for m in ("ndcg@10", "recall@100", "mrr@10")}
                row[arm]["per_seed_ndcg@10"] = [p["ndcg@10"] for p in per_seed]
                row[arm]["p_vs_warm_start_per_seed"] = [paired_randomisation(_per_query(r, target, qids), base)
                                                        for r in results]
                row[arm]["p_vs_warm_start"] = paired_randomisation(averaged, base)
            t = np.mean([_per_query(r, target, qids) for r in arms["target"]], axis=0)
            c = np.mean([_per_query(r, target, qids) for r in arms["control"]], axis=0)
            row["p_target_vs_control"] = paired_randomisation(t, c)
            row["p_target_vs_control_per_seed"] = [
                paired_randomisation(_per_query(a, target, qids), _per_query(b, target, qids))
                for a, b in zip(arms["target"], arms["control"])]
            entry[subset] = row
        out["targets"][target] = entry
    return out


def markdown(summary: dict) -> str:
    lines = [f"Seeds: {', '.join(map(str, summary['seeds']))}. nDCG@10 (CLS + dot), mean +- standard deviation over "
             "seeds; p: paired randomisation test over queries on per-query nDCG@10 (seed-averaged; per seed in "
             "brackets).", "",
             "| target | queries | warm start | pretrained on target | p vs warm | pretrained on control | p vs warm "
             "| p target vs control |", "|---|---|---|---|---|---|---|---|"]
    for target, entry in summary["targets"].items():
        for subset, row in entry.items():
            def arm(name: str) -> str:
                r = row[name]["ndcg@10"]
                return f"{r['mean']:.4f} +- {r['std']:.4f}"

            def p(name: str) -> str:
                seeds = ", ".join(f"{x:.3g}" for x in row[name]["p_vs_warm_start_per_seed"])
                return f"{row[name]['p_vs_warm_start']:.3g} [{seeds}]"

            vs = ", ".join(f"{x:.3g}" for x in row["p_target_vs_control_per_seed"])
            lines.append(f"| {target} ({subset}) | {row['queries']} | {row['warm start']['ndcg@10']:.4f} | "
                         f"{arm('target')} | {p('target')} | {arm('control')} | {p('control')} | "
                         f"{row['p_target_vs_control']:.3g} [{vs}] |")
    lines += ["", "| target | arm | Recall@100 | MRR@10 |", "|---|---|---|---|"]
    for target, entry in summary["targets"].items():
        row = entry["all queries"]
        lines.append(f"| {target} | warm start | {row['warm start']['recall@100']:.4f} | {row['warm start']['mrr@10']:.4f} |")
        for name in ("target", "control"):
            lines.append(f"| {target} | {name} | {row[name]['recall@100']['mean']:.4f} +- {row[name]['recall@100']['std']:.4f} "
                         f"| {row[name]['mrr@10']['mean']:.4f} +- {row[name]['mrr@10']['std']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(summary["targets"])
    fig, ax = plt.subplots(figsize=(max(5, 2.5 * len(targets)), 3.6))
    width = 0.25
    for i, target in enumerate(targets):
        row = summary["targets"][target]["all queries"]
        bars = ax.bar(i - width, row["warm start"]["ndcg@10"], width, color="0.6",
                      label="warm start" if i == 0 else None)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, label_type="center")
        for j, (arm, colour) in enumerate((("target", "C0"), ("control", "C1"))):
            bars = ax.bar(i + j * width, row[arm]["ndcg@10"]["mean"], width, yerr=row[arm]["ndcg@10"]["std"],
                          color=colour, capsize=3, label=f"pretrained on {arm}" if i == 0 else None)
            ax.bar_label(bars, fmt="%.3f", fontsize=7, label_type="center")
            ax.scatter([i + j * width] * len(row[arm]["per_seed_ndcg@10"]), row[arm]["per_seed_ndcg@10"], color="k",
                       s=8, zorder=3)
    ax.set_xticks(range(len(targets)), targets)
    ax.set(ylabel="nDCG@10 (zero-shot)", title="after continued pretraining")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)  # off the bars
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _check(args) -> None:
    problem = tokenizer_folder_problem(args.model)
    if problem or not (Path(args.model) / "config.json").is_file():
        raise ExperimentError(f"--model {args.model}: {problem or 'no config.json'}; give a local HF model folder.")
    for folder in args.targets:
        try:
            check_beir_folder(folder, args.split, flag="--targets")
        except EvalError as err:
            raise ExperimentError(str(err)) from None
    names = [Path(t).name for t in args.targets]
    if len(set(names)) != len(names):
        raise ExperimentError("--targets: two folders share a name; results are keyed by folder name.")
    if args.control != DOCSTRINGS and not Path(args.control).exists():
        raise ExperimentError(f"--control {args.control}: no such file or folder (a BEIR folder, a corpus.jsonl "
                              "or any input `python -m coco_accel.preprocess` reads).")
    if args.config and not Path(args.config).is_file():
        raise ExperimentError(f"--config {args.config}: no such file.")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ExperimentError("--seeds: give one or more distinct integers.")
    if not 0.0 <= args.report_fraction < 1.0:
        raise ExperimentError(f"--report_fraction must be in [0, 1), got {args.report_fraction}.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coco_accel.experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="The warm start (HF model folder with its tokenizer).")
    p.add_argument("--targets", required=True, nargs="+", help="BEIR folders: each is pretrained on and evaluated.")
    p.add_argument("--control", required=True, help="The control corpus: another collection's folder or corpus file, or 'docstrings' (the "
                   "demo's corpus of Python docstrings).")
    p.add_argument("--config", default=None, help="Training recipe YAML for every run (e.g. configs/coco_small.yaml).")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--report_fraction", type=float, default=0.0,
                   help="Share of each target's queries set aside (keyed) and reported apart from the rest.")
    p.add_argument("--num_proc", type=int, default=2, help="Preprocessing processes.")
    p.add_argument("--launcher", default="", help="Command prefix for training runs, e.g. 'accelerate launch "
                   "--config_file accelerate_configs/ddp.yaml' (default: one process, python -m coco_accel.train).")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="After --: extra flags for every training run.")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.train_args and args.train_args[0] == "--":
        args.train_args = args.train_args[1:]
    try:
        _check(args)
        Experiment(args).run()
    except ExperimentError as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
