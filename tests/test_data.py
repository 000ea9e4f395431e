"""Global batches: independent of the process count, pairs of spans, keyed choices."""

import numpy as np
import pytest
import torch

from coco_accel.training.batches import BatchPlan, SpanCollator, TrainBatches, load_train_data
from coco_accel.training.span_store import fetch_spans


def test_plan_slices_cover_the_global_batch_for_any_world_size():
    for world in (1, 2, 3):
        plans = [BatchPlan(num_docs=50, global_docs=12, seed=3, drop_last=False, world_size=world, rank=r)
                 for r in range(world)]
        for step in range(2 * plans[0].steps_per_epoch):
            epoch, docs = plans[0].global_batch(step)
            parts = [docs[p.local_slice(len(docs))] for p in plans]
            np.testing.assert_array_equal(np.concatenate(parts), docs)
    one = BatchPlan(50, 12, 3, False)
    assert one.steps_per_epoch == 5  # 4 full batches + the short one of 2 documents
    assert BatchPlan(50, 12, 3, True).steps_per_epoch == 4
    assert BatchPlan(49, 12, 3, False, world_size=3).steps_per_epoch == 4  # 1 left over < 3 processes
    # Each epoch visits every document once, in a new order.
    seen = np.concatenate([one.global_batch(s)[1] for s in range(5)])
    assert sorted(seen.tolist()) == list(range(50))
    assert not np.array_equal(one.epoch_order(0), one.epoch_order(1))


def test_keyed_permutation_is_a_bijection_of_any_size():
    from coco_accel.common.keyed_random import keyed_permutation

    for n in (1, 2, 3, 5, 16, 17, 117, 1000, 4097):
        perm = keyed_permutation(np.arange(n), n, 42, 0, 21)
        assert sorted(perm.tolist()) == list(range(n))
        np.testing.assert_array_equal(keyed_permutation(np.arange(n)[::-1], n, 42, 0, 21), perm[::-1])
    other = keyed_permutation(np.arange(1000), 1000, 42, 1, 21)
    assert (other != keyed_permutation(np.arange(1000), 1000, 42, 0, 21)).mean() > 0.9  # epochs reshuffle
    with pytest.raises(ValueError, match="range"):
        keyed_permutation(np.array([5]), 5, 0)


@pytest.mark.parametrize("world", [8, 64, 256])
@pytest.mark.parametrize("rest", [1001, 100])
def test_many_ranks_cover_each_epoch_once_with_the_single_process_batches(world, rest):
    """Plans for every rank of a large job, computed here: each epoch uses every document once across the
    ranks, each global batch is the single-process one, and the short last batch follows the rule (kept
    when every rank gets a document, split as evenly as possible; else its documents wait for the next
    epoch)."""
    num_docs = 10 * 2048 + rest
    one = BatchPlan(num_docs, 2048, seed=5, drop_last=False)
    plans = [BatchPlan(num_docs, 2048, seed=5, drop_last=False, world_size=world, rank=r) for r in range(world)]
    keeps_short = rest >= world
    assert plans[0].steps_per_epoch == 10 + keeps_short and one.steps_per_epoch == 11
    for epoch in range(2):
        used = []
        for within in range(plans[0].steps_per_epoch):
            step = epoch * plans[0].steps_per_epoch + within
            e, docs = plans[0].global_batch(step)
            _, single = one.global_batch(epoch * one.steps_per_epoch + within)
            assert e == epoch
            np.testing.assert_array_equal(docs, single)
            parts = [docs[p.local_slice(len(docs))] for p in plans]
            assert [len(x) for x in parts] == plans[0].shares(len(docs))
            assert min(map(len, parts)) >= 1 and max(map(len, parts)) - min(map(len, parts)) <= 1
            if within == 10:
                assert len(docs) == rest and len(set(map(len, parts))) == 2  # really uneven
            used.append(np.concatenate(parts))
        used = np.concatenate(used)
        assert len(used) == len(set(used.tolist())) == num_docs - (0 if keeps_short else rest)


def test_a_batch_costs_its_own_size_whatever_the_corpus_and_step(monkeypatch):
    """The epoch order is evaluated at the batch's positions only: a 47M-document corpus and step 150,000
    (a resume) cost one batch's work, with nothing replayed or built for the whole corpus."""
    import coco_accel.training.batches as data

    sizes = []
    real = data.keyed_permutation
    monkeypatch.setattr(data, "keyed_permutation", lambda pos, n, *keys: sizes.append(len(pos)) or real(pos, n, *keys))
    plan = BatchPlan(47_300_000, 2048, seed=42, drop_last=False, world_size=64, rank=17)
    epoch, docs = plan.global_batch(150_000)
    assert epoch == 150_000 // plan.steps_per_epoch and len(docs) == 2048 and sizes == [2048]
    assert docs.min() >= 0 and docs.max() < 47_300_000


def test_batches_are_the_same_for_one_and_two_processes(span_data, tokenizer):
    ds = load_train_data(str(span_data))
    collator = SpanCollator(tokenizer, 64, 0.15, seed=7)
    single = TrainBatches(ds, BatchPlan(len(ds), 8, 7, False), collator)
    halves = [TrainBatches(ds, BatchPlan(len(ds), 8, 7, False, 2, r), collator) for r in range(2)]
    for step in (0, 1, 5):
        full = single[step]
        row = 0
        for rank, part in enumerate(h[step] for h in halves):
            n, width = part.tensors["input_ids"].shape
            for key in ("input_ids", "labels", "attention_mask"):
                assert torch.equal(full.tensors[key][row:row + n, :width], part.tensors[key])
            assert not full.tensors["attention_mask"][row:row + n, width:].any()  # the rest is padding
            assert np.array_equal(part.layout, full.layout[row:row + n, :1 + width])  # the host's view of the rows
            assert (part.step, part.global_docs, part.rank_docs, part.row_counts[rank]) == (step, 8, (4, 4), n)
            row += n
        assert row == full.tensors["input_ids"].shape[0] == 16 and full.rank_docs == (8,)


def test_rows_are_two_distinct_spans_of_each_document(span_data, tokenizer):
    ds = load_train_data(str(span_data))
    collator = SpanCollator(tokenizer, 128, 0.15, seed=1)
    docs = np.arange(6)
    doc_off, span_off, tokens = fetch_spans(ds, docs)
    first, second = collator.pick(0, docs, np.diff(doc_off))
    assert (first != second).all()
    batch = collator(0, docs, doc_off, span_off, tokens)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape[0] == 12
    original = torch.where(labels != -100, labels, ids)
    for d in range(6):
        spans = ds[int(d)]["spans"]
        for slot, pick in ((0, first[d]), (1, second[d])):
            row = original[2 * d + slot]
            n = int(batch["attention_mask"][2 * d + slot].sum())
            assert row[0] == tokenizer.cls_token_id and row[n - 1] == tokenizer.sep_token_id
            assert row[1:n - 1].tolist() == spans[pick]


def test_long_spans_are_cut_to_a_keyed_window(tokenizer):
    collator = SpanCollator(tokenizer, 10, 0.15, seed=1)
    tokens = np.arange(1000, 1100, dtype=np.int64)  # one document, two spans of 50 tokens
    batch = collator(0, np.array([0]), np.array([0, 2]), np.array([0, 50, 100]), tokens)
    assert batch["input_ids"].shape == (2, 10)
    again = collator(0, np.array([0]), np.array([0, 2]), np.array([0, 50, 100]), tokens)
    assert torch.equal(batch["labels"], again["labels"])
    orig = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    for row in orig:
        window = row[1:9].numpy()
        assert (np.diff(window) == 1).all()  # one contiguous window of the span


def test_documents_with_one_span_are_an_error(tokenizer):
    from coco_accel.training.batches import DataError

    collator = SpanCollator(tokenizer, 32, 0.15, seed=1)
    with pytest.raises(DataError, match="fewer than two spans"):
        collator(0, np.array([4]), np.array([0, 1]), np.array([0, 5]), np.arange(5))


def _spans_dataset(rows, token_type="uint16"):
    import datasets

    features = datasets.Features({"spans": datasets.List(datasets.List(datasets.Value(token_type)))})
    return datasets.Dataset.from_dict({"spans": rows}, features=features)


def _python_spans(dataset, docs):
    """The plain reading: each document's spans as Python lists, flattened to CSR."""
    rows = [dataset.with_format(None)[int(d)]["spans"] for d in docs]
    doc_off = np.cumsum([0] + [len(r) for r in rows])
    spans = [s for r in rows for s in r]
    span_off = np.cumsum([0] + [len(s) for s in spans])
    return doc_off, span_off, np.array([t for s in spans for t in s], dtype=np.int64)


@pytest.mark.parametrize("token_type", ["uint16", "int32"])
def test_the_span_store_reads_what_the_rows_hold(tmp_path, token_type):
    """SpanStore's reads from the Arrow buffers equal the rows as Python lists: saved and memory-mapped
    (several shards, record batches of 7 rows), sliced (a nonzero offset into the buffers) and concatenated."""
    import datasets

    from coco_accel.training.span_store import SpanStore

    rng = np.random.default_rng(0)
    rows = [[rng.integers(0, 30000, rng.integers(1, 9)).tolist() for _ in range(rng.integers(2, 6))] for _ in range(300)]
    saved = tmp_path / "saved"
    _spans_dataset(rows, token_type).save_to_disk(str(saved), num_shards=3)
    mapped = _spans_dataset(rows, token_type).map(lambda b: b, batched=True, batch_size=7, writer_batch_size=7,
                                                  cache_file_name=str(tmp_path / "small_batches.arrow"))
    assert len(mapped.data.table.column("spans").chunks) == 43  # memory-mapped record batches of 7 rows
    cases = {"in memory": _spans_dataset(rows, token_type), "saved in shards": datasets.load_from_disk(str(saved)),
             "memory-mapped": mapped,
             "sliced": mapped.select(range(37, 251)),
             "concatenated": datasets.concatenate_datasets([mapped.select(range(5, 90)), mapped.select(range(200, 300))])}
    for name, dataset in cases.items():
        store = SpanStore(dataset.with_format("arrow"))
        docs = np.concatenate([rng.integers(0, len(dataset), 64), [0, len(dataset) - 1]])
        got = store.fetch(docs)
        assert store._views, f"{name}: read through the fallback, not the buffers"
        for a, b in zip(got, _python_spans(dataset, docs)):
            assert np.array_equal(a, b), name
    with pytest.raises(IndexError):
        SpanStore(mapped.with_format("arrow")).fetch(np.array([300]))


def test_the_span_store_falls_back_where_it_cannot_address_the_buffers():
    """An indices mapping (a shuffled, unflattened dataset) goes through datasets' own gather, same result."""
    from coco_accel.training.span_store import SpanStore

    dataset = _spans_dataset([[[i, i + 1], [i + 2]] for i in range(50)]).shuffle(seed=0)
    assert dataset._indices is not None
    store = SpanStore(dataset.with_format("arrow"))
    docs = np.array([3, 1, 49])
    for a, b in zip(store.fetch(docs), _python_spans(dataset, docs)):
        assert np.array_equal(a, b)
    assert store._views == {}


def test_the_span_store_is_rebuilt_in_a_new_process(span_data):
    """Pickled into a spawned loader worker, the store carries no addresses: the worker builds its own."""
    import pickle

    from coco_accel.training.span_store import SpanStore

    store = SpanStore(load_train_data(str(span_data)).with_format("arrow"))
    docs = np.array([0, 5, 2])
    expected = store.fetch(docs)
    copy = pickle.loads(pickle.dumps(store))
    assert copy._views is None
    for a, b in zip(copy.fetch(docs), expected):
        assert np.array_equal(a, b)
