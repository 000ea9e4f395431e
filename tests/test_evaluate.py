"""Zero-shot evaluation: trec_eval values by hand, chunked search == full search, a real collection."""

import json
import math

import pytest
import torch

from coco_accel.evaluation.beir import EvalError, load_beir
from coco_accel.evaluation.__main__ import main
from coco_accel.evaluation.retrieval import Encoder, evaluate, exact_search, trec_metrics

from conftest import SHARED_DATA


def test_metrics_equal_hand_computed_trec_eval_values():
    qrels = {"q1": {"d1": 1, "d3": 2, "d9": 0}, "q2": {"d4": 1}, "q3": {"d5": 1}}
    run = {"q1": {"d2": 3.0, "d1": 2.0, "d3": 1.0}, "q2": {"d1": 1.0}, "q3": {}}
    m = trec_metrics(qrels, run)
    dcg = 1 / math.log2(3) + 2 / math.log2(4)  # d1 (gain 1) at rank 2, d3 (gain 2) at rank 3
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert m["q1"]["ndcg@10"] == pytest.approx(dcg / idcg, abs=1e-4)
    assert m["q1"]["recall@100"] == pytest.approx(1.0)
    assert m["q1"]["mrr@10"] == pytest.approx(0.5)
    assert m["q2"] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    assert m["q3"] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}  # judged, nothing retrieved: counts as 0


def test_mrr_is_cut_at_ten():
    run = {"q": {f"d{i}": 100.0 - i for i in range(20)}}
    m = trec_metrics({"q": {"d12": 1}}, run)
    assert m["q"]["mrr@10"] == 0.0 and m["q"]["recall@100"] == 1.0


@pytest.mark.parametrize("score", ["dot", "cos"])
def test_chunked_search_equals_full_search(score):
    torch.manual_seed(0)
    q, d = torch.randn(7, 16), torch.randn(103, 16)
    full = (torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(d, dim=-1).T
            if score == "cos" else q @ d.T)
    expect = torch.topk(full, 10, dim=1)
    for chunk in (1, 9, 50, 103, 500):
        got_scores, got_pos = exact_search(q, (d[i:i + chunk] for i in range(0, 103, chunk)), 10, score)
        assert torch.equal(got_pos, expect.indices)
        torch.testing.assert_close(got_scores, expect.values)
    s, p = exact_search(q, iter([d[:3]]), 10, score)
    assert p.shape == (7, 3)


def _toy_beir(folder, with_qrels=True):
    folder.mkdir(parents=True)
    docs = [("d1", "Cats", "cats purr and sleep"), ("d2", "Dogs", "dogs bark loudly"), ("q1", "", "same id as a query")]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n"
                                                 for i, t, x in docs))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "cat sleeping"}) + "\n"
                                          + json.dumps({"_id": "q2", "text": "unjudged"}) + "\n")
    if with_qrels:
        (folder / "qrels").mkdir()
        (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return folder


def test_toy_collection_end_to_end(tmp_path, tiny_bert):
    data = _toy_beir(tmp_path / "toy")
    queries, corpus, qrels, left_out = load_beir(str(data), "test")
    assert list(queries) == ["q1"] and corpus["d1"] == "Cats cats purr and sleep"
    assert left_out == {"queries_without_judgements": 1, "repeated_document_ids": 0, "judged_documents_not_in_corpus": 0}
    out = tmp_path / "r.json"
    assert main(["--model", tiny_bert, "--data", str(data), "--output", str(out), "--chunk_docs", "2"]) == 0
    res = json.loads(out.read_text())
    r = res["datasets"]["toy"]
    assert r["queries"] == 1 and r["queries_without_judgements"] == 1
    assert r["recall@100"] == 1.0  # two candidates left once the query's own id is removed
    assert res["average"]["ndcg@10"] == r["ndcg@10"]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_length_sorted_encoding_gives_each_text_its_own_vector_in_input_order(tiny_bert, pooling):
    """Texts are batched longest first; each vector equals the text encoded alone (no padding), in the order
    of the input, truncation included."""
    texts = ["a cat", "the quick brown fox jumps over the lazy dog " * 3, "", "dogs bark", "one two three four five",
             "x", "sleep " * 40]
    encoder = Encoder(tiny_bert, pooling=pooling, device="cpu", batch_size=3)
    got = encoder.encode(texts, 16)
    alone = torch.cat([encoder.encode([t], 16) for t in texts])
    assert got.shape == (len(texts), encoder.model.config.hidden_size)
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], got[3])
    assert encoder.encode([], 16).shape == (0, encoder.model.config.hidden_size)


def test_clear_errors(tmp_path, tiny_bert):
    with pytest.raises(EvalError, match="no qrels/test.tsv"):
        load_beir(str(_toy_beir(tmp_path / "noq", with_qrels=False)), "test")
    with pytest.raises(EvalError, match="no corpus.jsonl"):
        load_beir(str(tmp_path), "test")
    with pytest.raises(EvalError, match="no such folder"):
        evaluate(str(tmp_path / "nomodel"), [str(_toy_beir(tmp_path / "toy"))])
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    with pytest.raises(EvalError, match="holds no tokenizer files"):
        evaluate(str(tmp_path / "config_only"), [str(tmp_path / "toy")])


def test_every_folder_and_argument_is_checked_before_the_model_loads(tmp_path, tiny_bert, caplog, monkeypatch):
    import coco_accel.evaluation.retrieval as ev

    loaded = []
    monkeypatch.setattr(ev.Encoder, "__init__", lambda self, *a, **k: loaded.append(a))
    good = str(_toy_beir(tmp_path / "toy"))
    cases = [(["--data", good, str(tmp_path / "absent")], "--data " + str(tmp_path / "absent") + ": no such folder"),
             (["--data", good, "--split", "dev"], "no qrels/dev.tsv (splits present: ['test'])"),
             (["--data", good, "--batch_size", "0"], "--batch_size must be at least 1, got 0"),
             (["--data", good, "--chunk_docs", "0"], "--chunk_docs must be at least 1"),
             (["--data", good, "--query_max_len", "0"], "--query_max_len must be at least 3"),
             (["--data", good, "--output", str(tmp_path)], "is a folder: give a file name"),
             (["--data", good, "--output", str(tmp_path / "toy" / "corpus.jsonl" / "r.json")], "is a file")]
    for args, words in cases:
        caplog.clear()
        assert main(["--model", tiny_bert, *args]) == 2, args
        assert words in caplog.text, (args, caplog.text)
    assert not loaded


def test_lengths_beyond_the_models_positions(tmp_path, tiny_bert, caplog):
    assert main(["--model", tiny_bert, "--data", str(_toy_beir(tmp_path / "toy")), "--doc_max_len", "4096"]) == 2
    assert "--doc_max_len 4096 is longer than the model's 128 positions" in caplog.text


def test_what_is_left_out_is_counted(tmp_path):
    data = _toy_beir(tmp_path / "toy")
    with open(data / "corpus.jsonl", "a") as fh:
        fh.write(json.dumps({"_id": "d1", "title": "", "text": "a second d1"}) + "\n")
    with open(data / "qrels" / "test.tsv", "a") as fh:
        fh.write("q1\td404\t1\n")
    queries, corpus, qrels, left_out = load_beir(str(data), "test")
    assert corpus["d1"] == "a second d1"
    assert left_out == {"queries_without_judgements": 1, "repeated_document_ids": 1, "judged_documents_not_in_corpus": 1}


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    data = _toy_beir(tmp_path / "toy")
    with open(data / "corpus.jsonl", "ab") as fh:
        fh.write(b'{"_id": "d9", "text": "caf\xe9"}\n')
    lines = len((data / "corpus.jsonl").read_bytes().splitlines())
    with pytest.raises(EvalError, match=f"corpus.jsonl:{lines}: not UTF-8"):
        load_beir(str(data), "test")


@pytest.mark.skipif(not (SHARED_DATA / "cisi" / "qrels" / "test.tsv").is_file(), reason="shared CISI data not present")
def test_a_real_beir_folder_is_read_whole(tiny_bert):
    """CISI as BEIR ships it: every query with judgements and every document is evaluated. (The metrics'
    values are checked against trec_eval's definitions above and against an independent evaluator in
    tests/test_benchmarks.py; a random tiny model's scores tie, so its numbers here would say nothing.)"""
    res = evaluate(tiny_bert, [str(SHARED_DATA / "cisi")], chunk_docs=500)
    r = res["datasets"]["cisi"]
    judged = {line.split("\t")[0] for line in (SHARED_DATA / "cisi" / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    assert r["queries"] == len(judged) == 76 and r["documents"] == 1460
    assert sorted(r["per_query"]) == sorted(judged)


def test_report_renders_png_and_markdown(tmp_path):
    from coco_accel.report import main as report_main

    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 20 - s, "mlm_head": 8, "mlm_backbone": 8, "contrastive": 4 - s / 10,
              "contrastive_acc": s / 10, "lr": 1e-4} for s in (1, 5, 10)]
    lines += [{"step": s, "heldout/scifact/contrastive": 3 - s / 10, "heldout/scifact/contrastive_acc": 0.5}
              for s in (0, 5, 10)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    ev = {"datasets": {"cisi": {"ndcg@10": 0.1, "recall@100": 0.2, "mrr@10": 0.3}},
          "average": {"ndcg@10": 0.1, "recall@100": 0.2, "mrr@10": 0.3}}
    (run / "eval_before.json").write_text(json.dumps(ev))
    assert report_main([str(run)]) == 0
    png = (run / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (run / "report.md").read_text()
    assert "| scifact | 3.0000 (0) | 2.0000 (10) | +1.0000 |" in md
    assert "| cisi | before | 0.1000 |" in md
    assert report_main([str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("name, line, match", [
    ("corpus.jsonl", '{"title": "t", "text": "no id here"}', "corpus.jsonl:2: expected a JSON object with an \"_id\""),
    ("queries.jsonl", '["not", "an", "object"]', "queries.jsonl:2: expected a JSON object"),
    ("corpus.jsonl", '{"_id": "d9", "text": ', "corpus.jsonl:2: malformed JSON"),
])
def test_a_line_that_cannot_be_read_is_an_error_naming_it(tmp_path, name, line, match):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    files = {"corpus.jsonl": '{"_id": "d1", "title": "", "text": "a document"}\n',
             "queries.jsonl": '{"_id": "q1", "text": "a query"}\n'}
    files[name] += line + "\n"
    for file_name, text in files.items():
        (tmp_path / file_name).write_text(text)
    with pytest.raises(EvalError, match=match):
        load_beir(str(tmp_path), "test")
