"""Where one training step's time goes: kernels grouped by kind, the top kernels, and how long the device idles.

Profiles our step (and, with --reference, the reference style's) on the same synthetic spans as
benchmarks/step_throughput.py, with torch.profiler. On a GPU it reads the CUDA kernels; on a CPU the
operators. Its last line is one JSON object with the per-kind times.

    python benchmarks/step_profile.py --device cuda                  # ours at 2048 documents, BERT-base
    python benchmarks/step_profile.py --device cuda --compile --reference
    python benchmarks/step_profile.py                                # CPU, MiniLM-sized, 16 documents
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict

import torch

from step_throughput import PRESETS, environment, make_batch, make_model, on, our_step, reference_step

# First match wins, so attention comes before matmul: the memory-efficient attention kernels are CUTLASS
# templates (fmha_cutlassF/B...), and cuDNN's fused attention kernels carry "sdpa" in their names.
# Then the matmul kernels of cuBLAS (nvjet, sm90_xmma, cutlass gemms), PyTorch and Triton; CPU op names.
KINDS = [
    ("attention", r"fmha|flash|attention|attn|sdpa|\bmha"),
    ("matmul", r"gemm|nvjet|xmma|cutlass|cublas|addmm|\bmm\b|aten::mm|aten::bmm|aten::linear|matmul"),
    ("optimizer", r"multi_tensor|fused_adam|_fused_adamw|adam"),
    ("compiled fusion", r"triton"),
    ("layer norm", r"layer_norm|layernorm"),
    ("dropout", r"dropout|philox|bernoulli"),
    ("softmax / cross-entropy", r"softmax|nll_loss|cross_entropy|logsumexp"),
    ("copy / cast", r"copy|memcpy|memset|fill|_to_copy|cast"),
    ("indexing / embedding", r"index|scatter|gather|embedding|nonzero"),
    ("reduction", r"reduce|sum"),
    ("elementwise", r"elementwise|gelu|add|mul|div|where|exp"),
]


# Operators whose FLOPs the profiler counts (with_flops) and that launch the "matmul" kernels; `aten::linear`
# is left out, since it calls one of these.
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def profile(fn, steps: int, gpu: bool) -> dict:
    from torch.profiler import ProfilerActivity

    for _ in range(3):
        fn()
    if gpu:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with torch.profiler.profile(activities=activities, with_flops=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        if gpu:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    events = prof.events()
    matmul_flops = sum(e.flops or 0 for e in events
                       if e.device_type == torch.autograd.DeviceType.CPU and e.name in MATMUL_OPS)
    if gpu:  # device activity: kernels, copies, fills
        picked = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        spans = [(e.time_range.start, e.time_range.end) for e in picked]
        busy = busy_us(spans)
        own = {id(e): e.time_range.end - e.time_range.start for e in picked}
    else:  # operators' self times (their children's excluded), so nothing is counted twice
        picked = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")]
        own = {id(e): e.self_cpu_time_total for e in picked}
        busy = sum(own.values())
    by_kind, by_name, calls = defaultdict(float), defaultdict(float), defaultdict(int)
    for e in picked:
        by_kind[kind_of(e.name)] += own[id(e)]
        by_name[e.name] += own[id(e)]
        calls[e.name] += 1
    per = 1e3 * steps  # us over all steps -> ms per step
    matmul_us = by_kind.get("matmul", 0.0)
    return {"wall_ms": wall_us / per, "busy_ms": busy / per, "idle_fraction": max(0.0, 1 - busy / wall_us),
            "matmul_tflop": matmul_flops / steps / 1e12,
            "matmul_tflops_per_s": matmul_flops / (matmul_us * 1e-6) / 1e12 if matmul_us else None,
            "kinds_ms": {k: v / per for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [(name, calls[name] / steps, t / per) for name, t in
                    sorted(by_name.items(), key=lambda kv: -kv[1])[:25]]}


def report(label: str, r: dict) -> None:
    print(f"\n## {label}: {r['wall_ms']:.1f} ms/step under the profiler, device busy {r['busy_ms']:.1f} ms "
          f"(idle {r['idle_fraction']:.1%})")
    if r["matmul_tflops_per_s"]:  # what the matmuls achieve: near the card's matmul rate, the rest is elsewhere
        print(f"matmuls: {r['matmul_tflop']:.2f} TFLOP per step in {r['kinds_ms']['matmul']:.1f} ms of matmul "
              f"kernels = {r['matmul_tflops_per_s']:.3g} TFLOP/s")
    print("| kind | ms/step | share of busy |")
    print("|---|---|---|")
    for kind, ms in r["kinds_ms"].items():
        print(f"| {kind} | {ms:.2f} | {ms / r['busy_ms']:.1%} |")
    print("\n| top kernel / operator | calls/step | ms/step |")
    print("|---|---|---|")
    for name, n, ms in r["top"]:
        short = name if len(name) <= 110 else name[:107] + "..."
        print(f"| `{short}` | {n:g} | {ms:.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--docs", type=int, default=None, help="documents per step (default 2048 GPU / 16 CPU)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="default: bert-base on GPU, minilm on CPU")
    p.add_argument("--layout", default="pack128", help="packN or bucketC, as in step_throughput.py")
    p.add_argument("--steps", type=int, default=None, help="profiled steps after 3 warm-up steps (default 3 GPU / 1 CPU)")
    p.add_argument("--compile", action="store_true", help="also profile with torch.compile (Condenser.compile_parts)")
    p.add_argument("--reference", action="store_true", help="also profile the reference style")
    p.add_argument("--ref_docs", type=int, default=None, help="the reference style's documents (default 128 GPU / 16 CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("bert-base" if gpu else "minilm")
    docs = args.docs or (2048 if gpu else 16)
    steps = args.steps or (3 if gpu else 1)
    our_dtype = torch.bfloat16 if gpu else None
    results = {}
    if args.reference:
        ref_docs = args.ref_docs or (128 if gpu else 16)
        model = make_model(preset, "eager", 0, device, fused_qkv=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        batch = on(device, make_batch(ref_docs, 128, True, 0))
        scaler = torch.amp.GradScaler(enabled=gpu)
        results[f"reference, {ref_docs} docs"] = profile(
            lambda: reference_step(model, batch, opt, torch.float16 if gpu else None, scaler), steps, gpu)
        del model, opt
    model = make_model(preset, "sdpa", 8, device, args.layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu or None)
    host = make_batch(docs, 128, False, 0)
    batch = on(device, host)
    step = lambda: our_step(model, batch, host, opt, our_dtype, 0)
    results[f"ours, {docs} docs, {args.layout}"] = profile(step, steps, gpu)
    if args.compile:
        model.compile_parts()
        results[f"ours + torch.compile, {docs} docs, {args.layout}"] = profile(step, steps, gpu)
    env = environment(device, None)
    print(f"device: {env['gpu']} | model: {preset} + 2-layer head | torch {env['torch']} | commit {env['commit']}")
    for label, r in results.items():
        report(label, r)
    print(json.dumps({**env, "device": env["gpu"], "profiles": {k: {f: v for f, v in r.items() if f != "top"}
                                                   for k, r in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
