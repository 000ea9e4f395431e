"""Corpora -> spans: the span rule, determinism, every kind of bad input, and the counts invariant."""

import gzip
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest

from coco_accel.preprocess import main, preprocess
from coco_accel.preprocessing.corpora import InputError
from coco_accel.preprocessing.spans import drop_reason, group_spans

from conftest import REPO, SHARED_DATA

REPO_CONFIGS = REPO / "configs"


def test_group_spans_packs_sentences_up_to_the_limit():
    s = [[1] * 10, [2] * 10, [3] * 10, [4] * 5]
    never = np.zeros(4, dtype=bool)
    assert group_spans(s, never, 30) == [[1] * 10 + [2] * 10 + [3] * 10, [4] * 5]
    assert group_spans(s, never, 25) == [[1] * 10 + [2] * 10, [3] * 10 + [4] * 5]


def test_random_break_and_long_sentences():
    s = [[1] * 5, [2] * 5, [3] * 40, [4] * 5]
    breaks = np.array([True, True, False, False])  # a break before the first sentence changes nothing
    assert group_spans(s, breaks, 30) == [[1] * 5, [2] * 5, [3] * 40, [4] * 5]
    assert group_spans([[], [1, 2], []], np.zeros(3, dtype=bool), 30) == [[1, 2]]


def test_drop_rules():
    assert drop_reason([[1, 2, 3]]) == "fewer_than_two_spans"
    assert drop_reason([[1, 2], [3, 4, 5]]) == "short_first_span"
    assert drop_reason([[1, 2, 3], [4]]) == ""


def _write(path: Path, lines, binary=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if binary:
        path.write_bytes(b"".join(lines))
    else:
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = ("The library holds many books. Readers borrow them for two weeks at a time. Late returns cost a "
        "small fee, which funds new purchases. The catalogue lists every title by author and subject.")


def _doc(i, text=GOOD, title="Library"):
    return json.dumps({"_id": f"d{i}", "title": title, "text": text})


def test_bad_lines_are_counted_and_written_never_dropped(tmp_path, minilm_path):
    lines = [
        b"\xef\xbb\xbf" + _doc(0).encode() + b"\r\n",  # BOM + CRLF: fine
        _doc(1).encode() + b"\r\n",
        b'{"_id": "x", "text": \n',  # malformed JSON
        json.dumps({"_id": "n", "title": "t"}).encode() + b"\n",  # no text
        json.dumps({"_id": "s", "text": 5}).encode() + b"\n",  # non-string text
        json.dumps({"_id": "e", "text": "   ", "title": ""}).encode() + b"\n",  # empty
        b'{"_id": "u", "text": "caf\xe9"}\n',  # invalid UTF-8
        b'{"_id": "z", "text": "a\x00b"}\n',  # raw NUL byte
        _doc(1).encode() + b"\n",  # duplicate id
        json.dumps({"_id": "short", "text": "One sentence only."}).encode() + b"\n",  # dropped: one span
        _doc(9, text=" ".join([GOOD] * 2000)).encode() + b"\n",  # ~1 MB document: kept
        b"[1, 2]\n",  # not an object
    ]
    src = _write(tmp_path / "bad" / "corpus.jsonl", lines, binary=True)
    out = tmp_path / "out"
    stats = preprocess([str(src.parent)], minilm_path, str(out), cache_dir=str(tmp_path / "c"))
    t = stats["total"]
    assert t["read"] == 12 == t["kept"] + t["dropped"] + t["rejected"]
    assert t["kept"] == 3 and t["dropped"] == 1
    assert t["rejected_by_reason"] == {"duplicate_id": 1, "empty_text": 1, "invalid_utf8": 1, "malformed_json": 1,
                                       "missing_text": 1, "non_string_text": 1, "not_an_object": 1, "nul_byte": 1}
    assert stats["corpora"]["bad"] == t
    rejects = [json.loads(line) for line in open(out / "rejects.jsonl")]
    assert sorted(r["line"] for r in rejects) == [3, 4, 5, 6, 7, 8, 9, 12]
    assert all(r["file"] == str(src) and r["reason"] for r in rejects)
    assert json.loads((out / "stats.json").read_text())["total"] == t
    ds = datasets.load_from_disk(str(out))
    assert sorted(ds["doc_id"]) == ["d0", "d1", "d9"]
    assert ds.column_names == ["doc_id", "corpus", "spans"]
    big = ds[ds["doc_id"].index("d9")]["spans"]
    assert len(big) > 1000 and max(len(s) for s in big) <= 40


def test_tsv_gzip_reference_format_and_nested_folders(tmp_path, minilm_path):
    _write(tmp_path / "marco" / "collection.tsv", [f"{i}\t{GOOD}" for i in range(3)] + ["no-tab-here"])
    with gzip.open(tmp_path / "plain.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": GOOD}) + "\n")
    _write(tmp_path / "ref.jsonl", [json.dumps({"spans": GOOD})])
    for forum in ("android", "gis"):
        _write(tmp_path / "cqadupstack" / forum / "corpus.jsonl", [_doc(0)])
    stats = preprocess([str(tmp_path / p) for p in ("marco", "plain.jsonl.gz", "ref.jsonl", "cqadupstack")],
                       minilm_path, str(tmp_path / "out"), cache_dir=str(tmp_path / "c"))
    assert stats["corpora"]["marco"]["kept"] == 3 and stats["corpora"]["marco"]["rejected"] == 1
    assert stats["corpora"]["plain"]["kept"] == 1 and stats["corpora"]["ref"]["kept"] == 1
    assert stats["corpora"]["cqadupstack"]["kept"] == 2  # same _id in two forums: not a duplicate
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert set(ds["corpus"]) == {"marco", "plain", "ref", "cqadupstack"}
    assert {"android/d0", "gis/d0"} <= set(ds["doc_id"])


def test_structural_problems_are_clear_errors(tmp_path, minilm_path, caplog):
    (tmp_path / "nocorpus").mkdir()
    with pytest.raises(InputError, match="no corpus.jsonl"):
        preprocess([str(tmp_path / "nocorpus")], minilm_path, str(tmp_path / "o"))
    _write(tmp_path / "empty.jsonl", [], binary=True)
    with pytest.raises(InputError, match="empty"):
        preprocess([str(tmp_path / "empty.jsonl")], minilm_path, str(tmp_path / "o"))
    with pytest.raises(InputError, match="no such file"):
        preprocess([str(tmp_path / "missing.jsonl")], minilm_path, str(tmp_path / "o"))
    assert main(["--tokenizer", minilm_path, "--output_dir", str(tmp_path / "o"), str(tmp_path / "nocorpus")]) == 2
    assert "no corpus.jsonl" in caplog.text


def test_output_is_identical_for_one_and_two_processes(tmp_path, small_corpus, minilm_path):
    outs = []
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        preprocess([str(small_corpus)], minilm_path, str(out), num_proc=n, cache_dir=str(tmp_path / f"c{n}"))
        outs.append(datasets.load_from_disk(str(out)).to_dict())
    assert outs[0] == outs[1]
    assert len(outs[0]["doc_id"]) > 50


def test_span_breaks_change_with_the_seed_only(tmp_path, small_corpus, minilm_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / name
        preprocess([str(small_corpus)], minilm_path, str(out), seed=seed, cache_dir=str(tmp_path / name / "c"))
        runs[name] = datasets.load_from_disk(str(out))["spans"]
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]


@pytest.mark.skipif(not (SHARED_DATA / "cisi" / "corpus.jsonl").is_file(), reason="shared CISI data not present")
def test_cisi_integration(tmp_path, minilm_path):
    stats = preprocess([str(SHARED_DATA / "cisi")], minilm_path, str(tmp_path / "out"), cache_dir=str(tmp_path / "c"))
    t = stats["total"]
    assert t["read"] == 1460 == t["kept"] + t["dropped"] + t["rejected"]
    assert t["kept"] > 1200
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert all(len(spans) >= 2 and len(spans[0]) > 2 for spans in ds["spans"])
    assert set(ds["corpus"]) == {"cisi"}


def test_held_out_split_is_deterministic_and_disjoint(tmp_path, small_corpus, minilm_path):
    stats = preprocess([str(small_corpus)], minilm_path, str(tmp_path / "out"), eval_fraction=0.3,
                       cache_dir=str(tmp_path / "c"))
    dd = datasets.load_from_disk(str(tmp_path / "out"))
    assert set(dd) == {"train", "eval"}
    train, held = set(dd["train"]["doc_id"]), set(dd["eval"]["doc_id"])
    assert not train & held
    assert stats["total"]["held_out"] == len(held) and len(train) + len(held) == stats["total"]["kept"]
    assert 0.15 < len(held) / stats["total"]["kept"] < 0.45
    again = preprocess([str(small_corpus)], minilm_path, str(tmp_path / "again"), eval_fraction=0.3, num_proc=2,
                       cache_dir=str(tmp_path / "c2"))
    assert set(datasets.load_from_disk(str(tmp_path / "again"))["eval"]["doc_id"]) == held
    assert again["total"] == stats["total"]


def test_corpus_recipe_reports_missing_corpora_by_name(tmp_path, minilm_path, caplog):
    from coco_accel.preprocessing.corpora import resolve_recipe

    recipe = REPO_CONFIGS / "coco_corpora.yaml"
    root = tmp_path / "beir"
    _write(root / "scifact" / "corpus.jsonl", [_doc(0)])
    _write(root / "msmarco" / "collection.tsv", [f"7\t{GOOD}"])
    with pytest.raises(InputError, match="16 of 18 corpora.*trec-covid.*bioasq"):
        resolve_recipe(str(recipe), str(root), skip_missing=False)
    found, missing = resolve_recipe(str(recipe), str(root), skip_missing=True)
    assert sorted(Path(f).name for f in found) == ["msmarco", "scifact"] and len(missing) == 16
    rc = main(["--tokenizer", minilm_path, "--output_dir", str(tmp_path / "out"), "--corpora", str(recipe),
               "--corpus_root", str(root), "--skip_missing", "--cache_dir", str(tmp_path / "c")])
    assert rc == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert set(stats["corpora"]) == {"scifact", "msmarco"}


def test_reference_tokenized_folder_is_accepted_as_train_dir(tmp_path):
    from coco_accel.training.batches import DataError, load_train_data

    _write(tmp_path / "ref" / "part0.json", [json.dumps({"spans": [[5, 6, 7], [8, 9]]}),
                                             json.dumps({"spans": [[1, 2, 3], [4, 5, 6], [7]]})])
    ds = load_train_data(str(tmp_path / "ref"))
    assert len(ds) == 2 and ds[1]["spans"] == [[1, 2, 3], [4, 5, 6], [7]]
    _write(tmp_path / "broken" / "part0.json", ['{"spans": "not tokenized"}'])
    with pytest.raises(DataError, match="reference's tokenized"):
        load_train_data(str(tmp_path / "broken"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="neither"):
        load_train_data(str(tmp_path / "nothing"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_a_clear_error(tmp_path, minilm_path):
    path = _write(tmp_path / "locked.jsonl", [_doc(0)])
    path.chmod(0)
    with pytest.raises(InputError, match="cannot be read"):
        preprocess([str(path)], minilm_path, str(tmp_path / "o"))


def test_rerun_into_the_same_folder_replaces_the_layout(tmp_path, small_corpus, minilm_path):
    out = tmp_path / "out"
    preprocess([str(small_corpus)], minilm_path, str(out), cache_dir=str(tmp_path / "c"))
    assert isinstance(datasets.load_from_disk(str(out)), datasets.Dataset)
    preprocess([str(small_corpus)], minilm_path, str(out), eval_fraction=0.2, cache_dir=str(tmp_path / "c"))
    assert set(datasets.load_from_disk(str(out))) == {"train", "eval"}
    preprocess([str(small_corpus)], minilm_path, str(out), cache_dir=str(tmp_path / "c"))
    assert isinstance(datasets.load_from_disk(str(out)), datasets.Dataset)


def test_large_files_are_read_in_shards_with_true_line_numbers(tmp_path, minilm_path):
    from coco_accel.preprocessing import corpora

    lines = [_doc(i) for i in range(40)]
    lines[7] = '{"_id": "broken"'  # a reject in the first shard
    lines[33] = "[1]"  # and one in the last
    src = _write(tmp_path / "big" / "corpus.jsonl", lines)
    found = corpora.discover([str(src.parent)])
    parts = corpora.shards(found, 3, min_bytes=1)
    assert len(parts) == 3 and parts[0].first_line == 1
    rows = [r for p in parts for r in corpora.read_rows(p.source, p.start, p.end, p.first_line)]
    assert [r["line"] for r in rows] == list(range(1, 41))
    assert [r["doc_id"] for r in rows if not r["reject"]] == [f"d{i}" for i in range(40) if i not in (7, 33)]
    outs = []
    for n in (1, 3):
        out = tmp_path / f"o{n}"
        stats = preprocess([str(src.parent)], minilm_path, str(out), num_proc=n, min_shard_bytes=1,
                           cache_dir=str(tmp_path / f"c{n}"))
        outs.append((stats["total"], datasets.load_from_disk(str(out)).to_dict(), (out / "rejects.jsonl").read_text()))
    assert outs[0] == outs[1]
    assert sorted(json.loads(line)["line"] for line in outs[0][2].splitlines()) == [8, 34]


def test_rerun_on_unchanged_input_reuses_the_cache(tmp_path, small_corpus, minilm_path):
    """The second run reads nothing and maps nothing: no new cache file, the same output; a changed
    input file is read again."""
    import os
    import shutil

    src = tmp_path / "docs"
    shutil.copytree(small_corpus, src)
    cache = tmp_path / "cache"
    first = preprocess([str(src)], minilm_path, str(tmp_path / "a"), cache_dir=str(cache))
    files = sorted(p.name for p in cache.rglob("*") if p.is_file())
    again = preprocess([str(src)], minilm_path, str(tmp_path / "b"), cache_dir=str(cache))
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == files and again["total"] == first["total"]
    with open(src / "corpus.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"_id": "new", "text": "One sentence here. And another one there. A third one."}\n')
    st = os.stat(src / "corpus.jsonl")
    os.utime(src / "corpus.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = preprocess([str(src)], minilm_path, str(tmp_path / "c"), cache_dir=str(cache))
    assert changed["total"]["read"] == first["total"]["read"] + 1
    files = sorted(p.name for p in cache.rglob("*") if p.is_file())
    preprocess([str(src)], minilm_path, str(tmp_path / "d"), seed=7, cache_dir=str(cache))  # a new setting: mapped
    assert len([p for p in cache.rglob("*") if p.is_file()]) > len(files)


def test_span_cache_key_covers_every_setting(minilm_path, monkeypatch):
    """The spans' cache key (given to datasets.map) changes with the input, each span setting, the
    tokenizer, the Punkt parameters and the preprocessing code, and only with them."""
    from coco_accel.preprocessing import spans as spans_module
    from coco_accel.preprocessing.breaks import load_sentence_splitter
    from coco_accel.preprocessing.wordpiece import load_backend_tokenizer

    tok = load_backend_tokenizer(minilm_path)
    splitter, _ = load_sentence_splitter()

    def key(dataset="d0", features="f", tokenizer=tok, **changes):
        settings = dict(max_span_tokens=30, seed=42, eval_fraction=0.0, id_type="uint16") | changes
        return spans_module.SpanBuilder(tokenizer, splitter, **settings).fingerprint(dataset, features)

    base = key()
    assert key() == base  # stable within a run, and computed from values alone
    other_tokenizer = load_backend_tokenizer(minilm_path)
    other_tokenizer.normalizer = None
    variants = [key(dataset="d1"), key(features="g"), key(max_span_tokens=31), key(seed=7),
                key(eval_fraction=0.1), key(id_type="int32"), key(tokenizer=other_tokenizer)]
    assert base not in variants and len(set(variants)) == len(variants)
    splitter._params.abbrev_types.add("zzq")
    try:
        assert key() != base
    finally:
        splitter._params.abbrev_types.discard("zzq")
    package = Path(spans_module.__file__).parents[1]
    assert all((package / name).is_file() for name in spans_module.PIPELINE_SOURCES)
    stage = {str(p.relative_to(package)) for p in (package / "preprocessing").glob("*.py") if p.stem != "__init__"}
    assert stage - {"preprocessing/docstrings.py"} <= set(spans_module.PIPELINE_SOURCES)  # all its code is keyed
    monkeypatch.setattr(spans_module, "pipeline_key", lambda: "code changed")
    assert key() != base


def test_a_byte_level_bpe_tokenizer_preprocesses_deterministically_and_is_checked_at_training(
        tmp_path, small_corpus, tiny_bert):
    """Preprocessing with another kind of fast tokenizer (byte-level BPE, ModernBERT's and RoBERTa's kind,
    trained here on real text): the same spans on 1 and 2 processes, every id the tokenizer's, its identity
    recorded; a model with another vocabulary refuses the data before training."""
    from conftest import real_text, run_main, trained_tokenizer

    from coco_accel.common.tokenizer_files import vocab_sha256

    tokenizer = trained_tokenizer("byte-level bpe", real_text())
    tokenizer.save_pretrained(tmp_path / "bpe")
    outs = []
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        preprocess([str(small_corpus)], str(tmp_path / "bpe"), str(out), num_proc=n, cache_dir=str(tmp_path / f"c{n}"))
        outs.append(datasets.load_from_disk(str(out)).to_dict())
    assert outs[0] == outs[1] and len(outs[0]["doc_id"]) > 50
    ids = np.concatenate([np.concatenate(spans) for spans in outs[0]["spans"]])
    assert ids.max() < len(tokenizer) and ids.min() >= 0
    assert len(np.unique(ids)) > 200  # real text through a real vocabulary, not a handful of fallbacks
    stats = json.loads((tmp_path / "p1" / "stats.json").read_text())
    assert stats["tokenizer_vocab_sha256"] == vocab_sha256(tokenizer.get_vocab())
    run = run_main("train", "--model_name_or_path", tiny_bert, "--train_dir", str(tmp_path / "p1"), "--output_dir",
                   str(tmp_path / "run"), "--max_steps", "1", "--skip_from", "2", "--report_to", "none")
    assert run.returncode == 2 and "was tokenized with" in run.stderr
