"""What moves the COCO effect at CPU scale: one change at a time to a recipe, judged on the tuning queries.

From the recipe (`--config`, e.g. configs/coco_small.yaml), each variant changes one setting (learning
rate, steps, documents per step, warm-up, the backbone MLM loss, the masking rate, the head's
initialisation) and pretrains on the
target's own corpus with one seed, through the same steps as `python -m coco_accel.experiment` (its
preprocessed data, warm-start evaluation and finished runs in `--output_dir` are reused, so point it at
the experiment's folder). Each model is evaluated with `coco_accel.evaluation.retrieval`; the table gives nDCG@10 on
the TUNING queries only (the share `--report_fraction` sets aside stays unseen, as in the experiment)
and a paired randomisation test against the recipe itself.

    python benchmarks/recipe_sweep.py --model MODEL_DIR --target BEIR/cisi --config configs/coco_small.yaml \\
        --output_dir runs/coco_small --report_fraction 0.5

Prints the table; the last line is one JSON object with every variant's numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from coco_accel.experiment import Experiment, build_parser, paired_randomisation, query_split

VARIANTS = {  # name: (folder name, flags added to the recipe's)
    "recipe": ("", []),
    "learning rate 2e-5": ("lr2e-5", ["--learning_rate", "2e-5"]),
    "learning rate 1e-4": ("lr1e-4", ["--learning_rate", "1e-4"]),
    "50 steps": ("steps50", ["--max_steps", "50"]),
    "16 documents per step": ("docs16", ["--per_device_train_batch_size", "16"]),
    "no warm-up": ("warmup0", ["--warmup_ratio", "0"]),
    "no backbone MLM (head MLM only)": ("no_late_mlm", ["--late_mlm", "false"]),
    "masking 30%": ("mask30", ["--mlm_probability", "0.3"]),
    "64 documents per step": ("docs64", ["--per_device_train_batch_size", "64"]),
    "head copied from the last backbone layers": ("head_copy", ["--head_init", "copy"]),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--target", required=True, help="A BEIR folder: pretrained on and evaluated.")
    p.add_argument("--config", required=True)
    p.add_argument("--output_dir", required=True, help="The experiment's folder (its data and runs are reused).")
    p.add_argument("--report_fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--split", default="test")
    args = p.parse_args(argv)

    name = Path(args.target).name
    base = build_parser().parse_args(["--model", args.model, "--targets", args.target, "--control", "none",
                                      "--config", args.config, "--seeds", str(args.seed), "--output_dir",
                                      args.output_dir, "--split", args.split,
                                      "--report_fraction", str(args.report_fraction)])
    base.control = None  # no control arm: every variant pretrains on the target
    warm = Experiment(base).evaluate("warm_start", args.model)
    all_q = sorted(warm["datasets"][name]["per_query"])
    tuning, _ = query_split(all_q, args.report_fraction)

    def per_query(result):
        per = result["datasets"][name]["per_query"]
        return np.array([per[q]["ndcg@10"] for q in tuning])

    rows = {}
    for variant in args.variants:
        slug, flags = VARIANTS[variant]
        experiment = Experiment(argparse.Namespace(**{**vars(base), "train_args": flags}))
        data = experiment.preprocess(f"target_{name}", args.target)
        arm = f"target_{name}" + (f"_{slug}" if slug else "")  # the recipe's is the experiment's own run
        run = experiment.train(arm, data, args.seed)
        rows[variant] = per_query(experiment.evaluate(f"{arm}_seed{args.seed}", str(run)))

    reference = rows.get("recipe")
    base_q = per_query(warm)
    print(f"\n{name}, seed {args.seed}, nDCG@10 on the {len(tuning)} tuning queries (warm start {base_q.mean():.4f}):\n")
    print("| variant | nDCG@10 | change vs warm start | p vs warm start | p vs recipe |")
    print("|---|---|---|---|---|")
    out = {"target": name, "seed": args.seed, "tuning_queries": len(tuning), "warm_start": float(base_q.mean()),
           "variants": {}}
    for variant, values in rows.items():
        p_warm = paired_randomisation(values, base_q)
        p_recipe = paired_randomisation(values, reference) if reference is not None and variant != "recipe" else None
        out["variants"][variant] = {"ndcg@10": float(values.mean()), "p_vs_warm_start": p_warm, "p_vs_recipe": p_recipe}
        print(f"| {variant} | {values.mean():.4f} | {values.mean() - base_q.mean():+.4f} | {p_warm:.3g} | "
              f"{'-' if p_recipe is None else f'{p_recipe:.3g}'} |")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
