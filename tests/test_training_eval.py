"""Zero-shot retrieval measured during training (--eval_data): the numbers coco_accel.evaluation.retrieval gives the export,
the same on 1 and 2 processes, logged at step 0, every --eval_steps and at the end."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, forked_run, forked_torchrun, metrics, run_main, train_args, train_env, wait_for_logged_lines, \
    write_docstring_beir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    return write_docstring_beir(tmp_path_factory.mktemp("beir") / "docstrings")


def _flags(model, data, out, beir, per_device, *extra):
    return train_args(model, data, out, *extra, max_steps=4, per_device_train_batch_size=per_device,
                      report_to="none", learning_rate="1e-3", save_steps=0, logging_steps=1, eval_data=beir,
                      eval_steps=2, eval_batch_size=16)


def _evaluations(out):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if "eval/seconds" in r]


def test_training_eval_is_the_export_evaluation_and_the_same_on_two_processes(tmp_path, span_data, tiny_bert, beir):
    one, two = tmp_path / "one", tmp_path / "two"
    run = run_main("train", *_flags(tiny_bert, span_data, one, beir, 8))
    assert run.returncode == 0, run.stderr[-3000:]
    forked_run(forked_torchrun(2) + ["coco_accel/train.py", *_flags(tiny_bert, span_data, two, beir, 4)])

    evals = _evaluations(one)
    assert [r["step"] for r in evals] == [0, 2, 4]  # step 0, every --eval_steps, the end (here also a multiple)
    keys = {"eval/docstrings/ndcg@10", "eval/docstrings/recall@100", "eval/docstrings/mrr@10"}
    assert all(keys <= r.keys() and r["eval/seconds"] > 0 for r in evals)
    assert len({r["eval/docstrings/ndcg@10"] for r in evals}) > 1, "training did not change the retrieval numbers"
    assert len(metrics(one)) == 4  # training records unaffected
    # At step 0 both runs hold the same weights. Two processes share the corpus encoding (batch b on
    # process b mod 2) and merge their top lists: the vectors are one process's, so the numbers are equal.
    # (Later steps differ: fp32 training on 1 and 2 processes sums gradients in another order.)
    first_two = _evaluations(two)[0]
    assert first_two["step"] == 0 and {k: evals[0][k] for k in keys} == {k: first_two[k] for k in keys}

    # The last evaluation of each run is what `python -m coco_accel.evaluation` gives its export: the same
    # backbone weights, batches and code, the trained weights merged from two processes included.
    for run_dir in (one, two):
        out = run_dir / "export_eval.json"
        run = run_main("evaluation.__main__", "--model", run_dir, "--data", beir, "--batch_size", "16", "--output", out)
        assert run.returncode == 0, run.stderr[-3000:]
        exported = json.loads(out.read_text())["datasets"]["docstrings"]
        last = _evaluations(run_dir)[-1]
        for metric in ("ndcg@10", "recall@100", "mrr@10"):
            assert abs(exported[metric] - last[f"eval/docstrings/{metric}"]) < 1e-9, (run_dir.name, metric)


def test_resume_keeps_the_evaluation_history(tmp_path, span_data, tiny_bert, beir):
    """Stopped mid-run (STOP file) and resumed, a run's evaluations are the uninterrupted run's: those made
    before the checkpoint kept, none repeated, the later ones made once on the same weights."""
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    flags = ("--max_steps", "6")
    run = run_main("train", *_flags(tiny_bert, span_data, full, beir, 8, *flags))
    assert run.returncode == 0, run.stderr[-3000:]
    cmd = [sys.executable, "coco_accel/train.py", *_flags(tiny_bert, span_data, stopped, beir, 8, *flags)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_logged_lines(proc, stopped, 3)  # step 0's evaluation and two training records
    (stopped / "STOP").write_text("")
    assert proc.wait(timeout=300) == 75
    before = _evaluations(stopped)
    assert before and [r["step"] for r in before] == [0, 2, 4, 6][:len(before)]
    run = run_main("train", *cmd[2:])
    assert run.returncode == 0, run.stderr[-3000:]
    drop = ("eval/seconds",)  # the only field that may differ
    assert ([{k: v for k, v in r.items() if k not in drop} for r in _evaluations(stopped)]
            == [{k: v for k, v in r.items() if k not in drop} for r in _evaluations(full)])
    assert [r["step"] for r in _evaluations(full)] == [0, 2, 4, 6]


def test_report_shows_the_retrieval_records(tmp_path):
    from coco_accel.report import main as report

    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 3.0, "mlm_head": 1, "mlm_backbone": 1, "contrastive": 1, "contrastive_acc": 0.5}
             for s in (1, 2)]
    lines += [{"step": s, "eval/cisi/ndcg@10": 0.2 + s / 10, "eval/cisi/recall@100": 0.3, "eval/cisi/mrr@10": 0.4,
               "eval/seconds": 1.0} for s in (0, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert report([str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "| cisi | ndcg@10 | 0.2000 (0) | 0.4000 (2) | +0.2000 |" in md


def test_eval_data_mistakes_are_found_before_training(tmp_path, span_data, tiny_bert, beir, command):
    run = command("train", *_flags(tiny_bert, span_data, tmp_path / "o", beir, 8), "--eval_data", beir,
                  tmp_path / "nothing")
    assert run.returncode == 2 and "--eval_data" in run.stderr and "no such folder" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()
