"""Training-step throughput: the reference style and ours, in ONE process, on the same synthetic spans.

Reference style (luyug/Condenser / OpenMatch COCO-DR): fp16 autocast on GPU (fp32 on CPU, where
fp16 autocast is not how anyone trains), eager attention, every span padded to --max_seq_length,
MLM logits at every position (head and backbone), unfused AdamW.
Ours: bf16 autocast on GPU (fp32 on CPU), SDPA attention, spans packed into rows in one call (or
length groups, --layouts), the last backbone and head layers only where the losses read them, one
matmul for Q/K/V, MLM logits only at masked positions, fused AdamW on GPU; similarity and loss in
fp32 for both.
Spans follow the reference preprocessing: <= 30 tokens, a tenth longer (up to 126), CLS/SEP added.

    python benchmarks/step_throughput.py                 # CPU: a MiniLM-sized model, < 2 minutes
    python benchmarks/step_throughput.py --device cuda   # GPU: BERT-base, reference at 128 docs/GPU,
                                                         # ours at 128 and the best size up to 2048,
                                                         # eager and torch.compile (--no-compile: eager)

Prints a table (real tokens/s, padded tokens/s, step time, peak memory, MFU, ratio); the last line
is one JSON object with those numbers and `speedup` (our best real tokens/s over the reference's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent

from coco_accel.model.condenser import Condenser
from coco_accel.model.families.base import Rows
from coco_accel.model.packing import host_layout
from coco_accel.training.losses import span_contrastive_loss
from coco_accel.training.step import StepSettings, cached_step, plain_step
from coco_accel.training.tracking import peak_tflops, useful_flops_per_token

PRESETS = {  # (family, layers, hidden, heads, intermediate, vocabulary)
    "tiny": ("bert", 2, 64, 2, 128, 30522),  # the GPU checks' CPU dry run
    "minilm": ("bert", 6, 384, 12, 1536, 30522),
    "bert-base": ("bert", 12, 768, 12, 3072, 30522),
    # ModernBERT-base's shape (22 layers, 768 wide, GLU of 1152, 50,368 tokens, a global layer every third,
    # 128-token windows between them), and a MiniLM-sized one of its family for the CPU
    "modernbert-base": ("modernbert", 22, 768, 12, 1152, 50368),
    "modernbert-mini": ("modernbert", 6, 384, 6, 576, 50368),
}


def _backbone(preset: str, attn: str):
    from transformers import BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

    family, layers, hidden, heads, inter, vocab = PRESETS[preset]
    if family == "modernbert":
        return ModernBertForMaskedLM(ModernBertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=inter, local_attention=128, global_attn_every_n_layers=3, pad_token_id=0,
            cls_token_id=101, sep_token_id=102, bos_token_id=101, eos_token_id=102, attn_implementation=attn))
    return BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=inter, attn_implementation=attn))


def make_model(preset: str, attn: str, bucket_width: int, device, layout: str = "", fused_qkv: bool = True) -> Condenser:
    """layout: "packN" (packed rows of N tokens), "bucketC" (length groups, merge cost C, -1 = auto), or "".
    fused_qkv=False keeps the model's own separate query/key/value projections (the reference's)."""
    torch.manual_seed(0)
    layers = PRESETS[preset][1]
    model = Condenser(_backbone(preset, attn), n_head_layers=2, skip_from=min(6, layers // 2), late_mlm=True,
                      length_bucket_width=bucket_width if layout.startswith("bucket") else 0,
                      length_bucket_call_cost=int(layout[6:]) if layout.startswith("bucket") else -1,
                      pack_length=int(layout[4:]) if layout.startswith("pack") else 0, fused_qkv=fused_qkv)
    return model.to(device).train()


def make_batch(docs: int, max_len: int, pad_to_max: bool, seed: int) -> dict:
    """2 spans per document, on the host like the collator's; whole batch masked at 15% (token level is
    enough for timing).

    Span lengths are a stratified sample of the reference distribution (a tenth 31-126 tokens, the rest
    8-30, plus CLS/SEP; mean 26.95), shuffled: every batch size gets the distribution's mean length.
    Independent draws gave the reference's 256 spans a mean of 28.4, and since the reference pads to
    128 its real tokens/s is proportional to that luck (5% here), unlike ours at 4096 spans.
    """
    rng = np.random.default_rng(seed)
    n = 2 * docs
    u = (np.arange(n) + 0.5) / n  # quantiles of the length distribution
    body = np.where(u < 0.1, 31 + np.floor(u / 0.1 * 96), 8 + np.floor((u - 0.1) / 0.9 * 23)).astype(np.int64)
    body = rng.permutation(body)
    lengths = np.minimum(body + 2, max_len)
    width = max_len if pad_to_max else int(lengths.max())
    # drawn at full width and cut, so both styles see the same tokens and the same masks
    ids = rng.integers(1000, 30522, (n, max_len))[:, :width]
    draws = rng.random((n, max_len))[:, :width]
    attention = np.arange(width)[None, :] < lengths[:, None]
    ids = np.where(attention, ids, 0)
    ids[:, 0] = 101
    ids[np.arange(n), lengths - 1] = 102
    chosen = attention & (draws < 0.15)
    chosen[:, 0] = False
    chosen[np.arange(n), lengths - 1] = False
    labels = np.where(chosen, ids, -100)
    inputs = np.where(chosen, 103, ids)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return {"input_ids": t(inputs), "attention_mask": t(attention.astype(np.int64)), "labels": t(labels)}


def on(device, batch: dict) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def reference_step(model: Condenser, batch: dict, optimizer, autocast_dtype, scaler) -> None:
    """The reference's step: its loss, fp16 GradScaler on GPU, unfused AdamW."""
    loss = reference_loss(model, batch, autocast_dtype)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def reference_loss(model: Condenser, batch: dict, autocast_dtype) -> torch.Tensor:
    """The reference's computation: logits at every position, CE with ignore_index."""
    with torch.autocast(batch["input_ids"].device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model.mlm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   output_hidden_states=True)
        last, skip = out.hidden_states[-1], out.hidden_states[model.skip_from]
        hidden = torch.cat([last[:, :1], skip[:, 1:]], dim=1)
        rows = Rows.padded(batch["attention_mask"])  # transformers' own masks (and rotary positions)
        for layer in model.c_head:
            hidden = model.family.run_layer(layer, hidden, rows)
        transform, decoder = model.family.mlm_parts()
        head = lambda x: decoder(transform(x))  # noqa: E731  the whole MLM head, at every position
        if model.c_head_norm is not None:  # pre-norm families: the head's states pass its final norm
            hidden = model.c_head_norm(hidden)
        labels = batch["labels"]
        ce = torch.nn.functional.cross_entropy
        n_masked = max(int((labels != -100).sum()), 1)
        mlm = ce(head(hidden).flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum") / n_masked
        mlm = mlm + ce(head(last).flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum") / n_masked
        con, _ = span_contrastive_loss(last[:, 0], last[:, 0], row_offset=0, normalizer=last.shape[0])
    return mlm + con


def same_loss(preset: str, docs: int, max_len: int, width: int, device, layout: str) -> dict:
    """Correctness before speed: both styles, same weights and spans, fp32, no dropout -> the same loss."""
    ref = make_model(preset, "eager", 0, device, fused_qkv=False).eval()
    ours = make_model(preset, "sdpa", width, device, layout).eval()
    with torch.no_grad():
        a = float(reference_loss(ref, on(device, make_batch(docs, max_len, True, 0)), None))
        host = make_batch(docs, max_len, False, 0)
        layout = host_layout(host["attention_mask"], host["labels"])
        b = float(plain_step(ours, on(device, host), lambda loss, last: None, StepSettings(), layout=layout).loss)
    return {"reference_loss": a, "ours_loss": b, "abs_diff": abs(a - b)}


def our_step(model: Condenser, batch: dict, host: dict, optimizer, autocast_dtype, cache_chunk: int) -> int:
    """One training step as the trainer runs it (planned from the host copy of the batch, forward and losses
    under autocast, backward outside it); returns the tokens the encoder computed (padding included)."""
    settings = StepSettings()
    backward = lambda loss, last: loss.backward()
    compute = lambda: torch.autocast(batch["input_ids"].device.type, dtype=autocast_dtype,
                                     enabled=autocast_dtype is not None)
    layout = host_layout(host["attention_mask"], host["labels"])
    if cache_chunk > 0:
        parts = cached_step(model, batch, backward, settings, chunk_size=cache_chunk, layout=layout, compute=compute)
    else:
        parts = plain_step(model, batch, backward, settings, layout=layout, compute=compute)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parts.computed_tokens


def measure(fn, steps: int, device) -> tuple[float, float, object]:
    """(seconds per step, peak GiB, what fn returned) after warm-up steps (kernel selection, allocator growth)."""
    for _ in range(3 if device.type == "cuda" else 1):
        result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return secs, peak, result


def executed_flops(fn) -> int:
    """FLOPs of the matrix products and attention that one call of `fn` runs (forward and backward, padding
    and partial layers as computed), by torch's FlopCounterMode. CUDA's attention kernels are in its table;
    the CPU's fused SDPA kernels are added here with the same formulas."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    cpu_sdpa = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, out_shape=None, **__: fc.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, out_shape=None, **__: fc.sdpa_backward_flop_count(grad, q, k, v),
    }
    with fc.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return counter.get_total_flops()


def environment(device, commit: str | None) -> dict:
    """What a result must name to be compared later: the device, its driver, the libraries, the commit."""
    import transformers

    gpu = device.type == "cuda"
    driver = None
    if gpu:
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = None
    commit = commit or os.environ.get("COCO_ACCEL_COMMIT")  # a copied tree need not carry .git
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                    timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"gpu": torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()}, "
                                                            f"{os.cpu_count()} cores)",
            "driver": driver, "cuda": torch.version.cuda if gpu else None, "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: minilm on CPU, bert-base on GPU")
    p.add_argument("--ref_docs", type=int, default=None, help="documents per step, reference (default 16 CPU / 128 GPU)")
    p.add_argument("--our_docs", default=None, help="comma list of our batch sizes (default 16 CPU; 128,...,2048 GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 3 CPU / 10 GPU)")
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--bucket_width", type=int, default=8)
    p.add_argument("--layouts", default="pack128", help="comma list of row layouts to compare: packN (--pack_length "
                   "N, the trainer's default is pack128), bucketC (--pack_length 0, --length_bucket_call_cost C; "
                   "-1 = auto); the JSON speaks of the first")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="add torch.compile rows (--torch_compile) at every batch size of the first layout; default: "
                        "on for GPU (about a minute of compilation), off for CPU")
    p.add_argument("--cache_chunk", default=None, help="spans per chunk for the gradient-cache rows (comma list: one "
                   "row each; default 1024,2048 on GPU, 512 on CPU); the JSON's ratio takes the fastest")
    p.add_argument("--cache_row", action="store_true", help="add the gradient-cache row on CPU too (always on GPU)")
    p.add_argument("--unfused_row", action="store_true", help="add a row with separate query/key/value projections "
                   "at the largest batch on CPU too (always on GPU)")
    p.add_argument("--peak_tflops", type=float, default=None, help="for MFU (default: 989 on H100/H200, 312 on A100, none on CPU)")
    p.add_argument("--commit", default=None, help="the commit measured (default: $COCO_ACCEL_COMMIT, else `git rev-parse HEAD`)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    compile_rows = gpu if args.compile is None else args.compile
    preset = args.preset or ("bert-base" if gpu else "minilm")
    steps = args.steps or (10 if gpu else 3)
    ref_docs = args.ref_docs or (128 if gpu else 16)
    our_docs = [int(x) for x in (args.our_docs or ("128,256,512,1024,2048" if gpu else "16")).split(",")]
    peak = args.peak_tflops or peak_tflops(device)
    env = environment(device, args.commit)
    ref_dtype = torch.float16 if gpu else None
    our_dtype = torch.bfloat16 if gpu else None
    scaler = torch.amp.GradScaler(enabled=gpu)
    costs = args.layouts.split(",")
    rows: list[dict] = []
    eager_flops: dict[tuple[int, str], int] = {}  # our step's executed FLOPs by (docs, layout), for compiled rows
    print(f"device: {env['gpu']} | driver {env['driver']} | torch {env['torch']} | transformers "
          f"{env['transformers']} | commit {env['commit']} | model: {preset} + 2-layer head | {steps} timed steps "
          f"per row", flush=True)
    check = same_loss(preset, min(ref_docs, 16), args.max_seq_length, args.bucket_width, device, costs[0])
    print(f"same spans, same weights, fp32, no dropout: reference loss {check['reference_loss']:.6f}, "
          f"ours {check['ours_loss']:.6f} (|diff| {check['abs_diff']:.1e})")
    print("| style | docs/step | layout | step ms | real tok/s | computed tok/s | peak GiB | MFU (executed) | "
          "vs reference |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)

    def record(label, docs, fn, batch, model, layout=None, optional=False, flops=None):
        """One row, printed as soon as it is measured. optional: a row whose failure (torch.compile's) is
        reported in the table instead of ending the run. flops: the step's executed FLOPs when known."""
        try:
            secs, mem, computed = measure(fn, steps, device)
            executed = flops if flops is not None else executed_flops(fn)
        except Exception as err:  # noqa: BLE001 - out of memory, or an optional row's failure, becomes a row
            if not (isinstance(err, torch.OutOfMemoryError) or optional):
                raise
            failure = "out of memory" if isinstance(err, torch.OutOfMemoryError) else \
                f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
            rows.append({"style": label, "docs": docs, "layout": layout, "failed": failure})
            print_row(rows[-1], rows)
            if gpu:
                torch.cuda.empty_cache()
            return
        real = int(batch["attention_mask"].sum())
        padded = computed if computed is not None else batch["attention_mask"].numel()
        useful = useful_flops_per_token(model.config, n_head_layers=len(model.c_head),
                                        avg_len=real / batch["input_ids"].shape[0], mlm_fraction=0.15,
                                        late_mlm=model.late_mlm) * real
        if label == "ours":
            eager_flops[(docs, layout)] = executed
        rows.append({"style": label, "docs": docs, "layout": layout, "step_ms": secs * 1e3,
                     "real_tok_s": real / secs, "padded_tok_s": padded / secs, "peak_gib": mem,
                     "executed_tflop": executed / 1e12, "executed_tflops_per_s": executed / secs / 1e12,
                     "mfu": executed / secs / (peak * 1e12) if peak else None,
                     "model_mfu": useful / secs / (peak * 1e12) if peak else None})
        print_row(rows[-1], rows)

    try:
        model = make_model(preset, "eager", 0, device, fused_qkv=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        batch = on(device, make_batch(ref_docs, args.max_seq_length, True, 0))
        record("reference", ref_docs, lambda: reference_step(model, batch, opt, ref_dtype, scaler), batch, model)
        del model, opt
        for cost in costs:
            measure_layout(record, eager_flops, args, cost, cost == costs[0], preset, device, our_docs, ref_docs,
                           our_dtype, compile_rows)
    finally:  # what was measured is reported even when a later row ends the run
        result = summarize(rows, costs[0], ref_docs, max(our_docs), env, preset, check)
        print(json.dumps(result), flush=True)
    return 0


def measure_layout(record, eager_flops, args, cost, first, preset, device, our_docs, ref_docs, our_dtype,
                   compile_rows) -> None:
    """Our rows for one row layout: every batch size, and for the first layout the gradient cache at the
    largest, torch.compile at every size (largest first) and separate Q/K/V projections."""
    gpu = device.type == "cuda"
    model = make_model(preset, "sdpa", args.bucket_width, device, cost)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu or None)
    for docs in sorted(set(our_docs + [ref_docs])):
        host = make_batch(docs, args.max_seq_length, False, 0)
        batch = on(device, host)
        record("ours", docs, lambda: our_step(model, batch, host, opt, our_dtype, 0), batch, model, cost)
        if (gpu or args.cache_row) and docs == max(our_docs) and first:
            for chunk in (int(x) for x in (args.cache_chunk or ("1024,2048" if gpu else "512")).split(",")):
                record(f"ours + gradient cache ({chunk} spans/chunk)", docs,
                       lambda: our_step(model, batch, host, opt, our_dtype, chunk), batch, model, cost)
        if gpu:
            torch.cuda.empty_cache()
    if compile_rows and first:
        model.compile_parts()  # dynamic shapes: compiled once, for every batch size
        for docs in sorted(set(our_docs + [ref_docs]), reverse=True):
            host = make_batch(docs, args.max_seq_length, False, 0)
            batch = on(device, host)
            record("ours + torch.compile", docs, lambda: our_step(model, batch, host, opt, our_dtype, 0), batch,
                   model, cost, optional=True, flops=eager_flops.get((docs, cost)))
            if gpu:
                torch.cuda.empty_cache()
    del model, opt
    if gpu:
        torch.cuda.empty_cache()
    if (gpu or args.unfused_row) and first:  # what fusing the Q/K/V projections is worth
        model = make_model(preset, "sdpa", args.bucket_width, device, cost, fused_qkv=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu or None)
        host = make_batch(max(our_docs), args.max_seq_length, False, 0)
        batch = on(device, host)
        record("ours, separate Q/K/V projections", max(our_docs),
               lambda: our_step(model, batch, host, opt, our_dtype, 0), batch, model, cost)
        del model, opt
        if gpu:
            torch.cuda.empty_cache()


def print_row(r: dict, rows: list[dict]) -> None:
    ref = rows[0] if rows and rows[0]["style"] == "reference" and not rows[0].get("failed") else None
    cost = r["layout"] or ""
    if r.get("failed"):
        print(f"| {r['style']} | {r['docs']} | {cost} | {r['failed']} | | | | | |", flush=True)
        return
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    ratio = f"{r['real_tok_s'] / ref['real_tok_s']:.2f}x" if ref else "n/a"
    mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
    print(f"| {r['style']} | {r['docs']} | {cost} | {r['step_ms']:.0f} | {r['real_tok_s']:,.0f} | "
          f"{r['padded_tok_s']:,.0f} | {mem} | {mfu} | {ratio} |", flush=True)


def summarize(rows: list[dict], layout: str, ref_docs: int, max_docs: int, env: dict, preset: str,
              check: dict) -> dict:
    """The JSON line: the environment, every row, and the ratios of the first layout's rows to the reference's
    (None where a row they need was not measured)."""
    done = [r for r in rows if not r.get("failed")]
    ref = next((r for r in done if r["style"] == "reference"), None)
    first = [r for r in done if r["layout"] == layout]  # the configuration the JSON speaks of
    ours = [r for r in first if r["style"] in ("ours", "ours + torch.compile")]  # with or without compile
    best = max(ours, key=lambda r: r["real_tok_s"], default=None)
    same = max((r for r in ours if r["docs"] == ref_docs), key=lambda r: r["real_tok_s"], default=None)
    eager = [r for r in ours if r["style"] == "ours"]
    ratio = lambda r: r["real_tok_s"] / ref["real_tok_s"] if r and ref else None
    result = {**env, "device": env["gpu"], "preset": preset, "loss_check": check, "rows": rows, "layout": layout,
              "reference_real_tok_s": ref and ref["real_tok_s"],
              "ours_best_real_tok_s": best and best["real_tok_s"], "ours_best_docs": best and best["docs"],
              "ours_best_style": best and best["style"], "ours_best_mfu": best and best["mfu"],
              "speedup_same_batch": ratio(same),
              "speedup_without_compile": ratio(max(eager, key=lambda r: r["real_tok_s"], default=None)),
              "speedup": ratio(best), "cache_over_plain_step_time": None, "fused_qkv_speedup": None}
    cached = min((r for r in first if "gradient cache" in r["style"]), key=lambda r: r["step_ms"], default=None)
    plain_at_max = next((r for r in first if r["style"] == "ours" and r["docs"] == max_docs), None)
    if cached and plain_at_max:
        result["cache_over_plain_step_time"] = cached["step_ms"] / plain_at_max["step_ms"]
    unfused = next((r for r in first if r["style"] == "ours, separate Q/K/V projections"), None)
    if unfused and plain_at_max:
        result["fused_qkv_speedup"] = plain_at_max["real_tok_s"] / unfused["real_tok_s"]
    return result


if __name__ == "__main__":
    sys.exit(main())
