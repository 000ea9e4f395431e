"""`python -m coco_accel.experiment`: the ablation's mechanics (real trainer, real evaluator) and its statistics."""

import json

import numpy as np
import pytest

from conftest import run_main, write_docstring_beir


def exact_p(a, b) -> float:
    """The randomisation test's p-value by enumeration of every sign pattern of the paired differences (an
    independent computation of what `paired_randomisation` estimates by sampling)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    signs = 1 - 2 * ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1)
    return float(np.mean(np.abs(signs @ d) / d.size >= abs(d.mean()) - 1e-15))


# Sampling 10,000 sign patterns estimates a p-value with a standard error of sqrt(p(1-p)/10,000) <= 0.005;
# the +1 correction adds at most 1e-4. Four standard errors:
P_TOL = 0.02


def test_paired_randomisation():
    from coco_accel.experiment import paired_randomisation

    rng = np.random.default_rng(0)
    base = rng.random(14)
    assert paired_randomisation(base, base) == 1.0
    assert paired_randomisation(base + 0.05, base) < 1e-3  # every query better: the smallest p the test can give
    for spread in (0.05, 0.2, 0.5):  # p-values from small to large
        noisy = base + 0.02 + rng.normal(0, spread, 14)
        p = paired_randomisation(noisy, base)
        assert p == pytest.approx(exact_p(noisy, base), abs=P_TOL) and p == paired_randomisation(base, noisy)


def test_query_split_is_keyed_and_disjoint():
    from coco_accel.experiment import query_split

    qids = [f"q{i}" for i in range(200)]
    tuning, reported = query_split(qids, 0.5)
    assert set(tuning).isdisjoint(reported) and sorted(tuning + reported) == sorted(qids)
    assert 70 < len(reported) < 130 and query_split(qids[::-1], 0.5)[1] == reported[::-1]


@pytest.mark.slow
def test_the_experiment_runs_and_resumes_without_redoing(tmp_path, tiny_bert, small_corpus):
    target = write_docstring_beir(tmp_path / "toy", n_docs=60, n_queries=16)
    out = tmp_path / "exp"

    def experiment(*seeds):  # in this process; it launches each training run as a process of its own
        return run_main("experiment", "--model", tiny_bert, "--targets", target, "--control", small_corpus, "--seeds",
                        *seeds, "--output_dir", out, "--report_fraction", "0.5", "--", "--max_steps", "2",
                        "--per_device_train_batch_size", "8", "--skip_from", "2", "--save_steps", "0")

    run = experiment(1)
    assert run.returncode == 0, run.stderr[-3000:]
    done = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed1/DONE")}
    evals = {p: p.stat().st_mtime_ns for p in out.glob("eval/*.json")}
    assert len(done) == 2 and len(evals) == 3  # target and control runs; warm start and both evaluated

    run = experiment(1, 2)  # the same command with one more seed: nothing finished is redone
    assert run.returncode == 0, run.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in done} == done and {p: p.stat().st_mtime_ns for p in evals} == evals
    assert "Training target_toy, seed 1" not in run.stderr and "Training target_toy, seed 2" in run.stderr
    results = json.loads((out / "results.json").read_text())
    rows = results["targets"]["toy"]
    assert set(rows) == {"all queries", "tuning queries", "reported queries"}
    judged = len((target / "queries.jsonl").read_text().splitlines())
    assert judged >= 12  # documents of one or two sentences give no query
    assert rows["tuning queries"]["queries"] + rows["reported queries"]["queries"] == rows["all queries"]["queries"] == judged
    row = rows["all queries"]
    assert len(row["target"]["per_seed_ndcg@10"]) == 2 and len(row["p_target_vs_control_per_seed"]) == 2
    # the reported p-values are those of the evaluations' per-query numbers (by enumeration: at most 16 queries)
    per_query = {p.stem: json.loads(p.read_text())["datasets"]["toy"]["per_query"] for p in out.glob("eval/*.json")}
    scores = {label: [q["ndcg@10"] for _, q in sorted(per.items())] for label, per in per_query.items()}
    target_labels = sorted(label for label in scores if label.startswith("target"))
    control_labels = sorted(label for label in scores if label.startswith("control"))
    assert len(target_labels) == len(control_labels) == 2
    for label, p in zip(target_labels, row["target"]["p_vs_warm_start_per_seed"]):
        assert p == pytest.approx(exact_p(scores[label], scores["warm_start"]), abs=P_TOL)
    t = np.mean([scores[label] for label in target_labels], axis=0)
    c = np.mean([scores[label] for label in control_labels], axis=0)
    assert row["p_target_vs_control"] == pytest.approx(exact_p(t, c), abs=P_TOL)
    # the table's numbers are the evaluator's: the warm start's mean over all queries
    warm = json.loads((out / "eval" / "warm_start.json").read_text())["datasets"]["toy"]["ndcg@10"]
    assert row["warm start"]["ndcg@10"] == pytest.approx(warm, abs=1e-12)
    assert "| toy (reported queries) |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_experiment_input_mistakes(tmp_path, tiny_bert, command):
    run = command("experiment", "--model", tiny_bert, "--targets", tmp_path / "none", "--control", "docstrings",
                  "--output_dir", tmp_path / "o")
    assert run.returncode == 2 and "--targets" in run.stderr and "no such folder" in run.stderr
