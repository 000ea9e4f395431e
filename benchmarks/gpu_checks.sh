#!/usr/bin/env bash
# Every GPU check in one call, inside a total of 7 minutes (BUDGET_S=420), on a machine that reaches no
# package index: run benchmarks/gpu_prepare.sh DIR on a machine that does, carry DIR along, then
#
#   bash benchmarks/gpu_checks.sh DIR OUT
#   DRY_RUN=1 bash benchmarks/gpu_checks.sh DIR OUT    # the same path on the CPU, tiny sizes, about a minute
#
# The parts, in this order, each under its own timeout, each result printed as it is measured, a failing
# part reported and the next one run:
#   1. the GPU tests that do not compile (tests/test_gpu.py, -m gpu);
#   2. the step benchmark (benchmarks/step_throughput.py: reference style at 128 documents, ours at 128,
#      512 and 2048, gradient cache, torch.compile, separate Q/K/V);
#   3. the real trainer (accelerate launch, data loader, collator, optimizer) on ONE GPU at the paper's
#      2048-document batch, BERT-base from a config: plain and gradient-cached, then compiled if time remains;
#   4. where the step's time goes (benchmarks/step_profile.py, ours and the reference style).
# OUT receives three files: gpu_checks.log (everything printed), step_throughput.json (the benchmark's
# JSON line: rows, ratios, gpu, driver, torch, transformers, commit) and results.tar.gz (each part's own
# output and the trainer's metrics.jsonl).
set -uo pipefail
dir=${1:?usage: bash benchmarks/gpu_checks.sh DIR OUT}
out=${2:?usage: bash benchmarks/gpu_checks.sh DIR OUT}
cd "$(dirname "$0")/.."
dir=$(realpath "$dir")
mkdir -p "$out"
out=$(realpath "$out")
py=${PYTHON:-python3}
dry=${DRY_RUN:-0}
budget=${BUDGET_S:-420}
start=$SECONDS
work=$(mktemp -d)
results="$work/results"
mkdir -p "$results"
exec > >(tee "$out/gpu_checks.log") 2>&1
trap 'tar -czf "$out/results.tar.gz" -C "$work" results 2>/dev/null; rm -rf "$work"' EXIT

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_DATASETS_DISABLE_PROGRESS_BARS=1 COCO_ACCEL_TEST_TOKENIZER="$dir/tokenizer"
export COCO_ACCEL_COMMIT=$(cat "$dir/commit.txt" 2>/dev/null || echo unknown)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, installed or not
if [ "$dry" = 1 ]; then
    device=cpu launch_config=accelerate_configs/cpu.yaml
else
    device=cuda launch_config=accelerate_configs/single_gpu.yaml
fi

if compgen -G "$dir/wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$dir"/wheels/*.whl \
        && export PYTHONPATH="$work/site:$PYTHONPATH" || echo "!! the wheels did not install: parts that need them fail"
fi

failed=()
echo "== commit $COCO_ACCEL_COMMIT | device $device | budget ${budget}s"
[ "$dry" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
# one Python start for the versions, the carried packages' requirements and the attention kernel
"$py" - "$dir/packages.txt" "$device" <<'EOF' || failed+=(requirements)
"""The versions; each package of packages.txt at its version with every requirement it declares (extras
aside) met by what this Python sees (the carried wheels or the image's own packages); and which SDPA kernel
runs the packed rows' attention (rows of 128 slots, a per-span boolean mask, BERT-base's 12 heads of 64),
forward and backward, as the profiler sees it."""
import importlib
import platform
import sys
from importlib.metadata import PackageNotFoundError, distribution, version

import torch
from packaging.requirements import Requirement
from torch.profiler import ProfilerActivity, profile

print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
for name in ("transformers", "accelerate", "datasets", "deepspeed", "nltk", "pyarrow", "fsspec"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}", end=" | ")
    except Exception as err:  # noqa: BLE001 - a missing or broken package is reported, not fatal
        print(f"{name} MISSING ({type(err).__name__}: {err})", end=" | ")
print()

problems = []
for line in open(sys.argv[1]).read().split():
    name, wanted = line.split("==")
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        problems.append(f"{name} is not installed")
        continue
    if dist.version != wanted:
        problems.append(f"{name} is {dist.version}, not {wanted}")
    for req in map(Requirement, dist.requires or []):
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            problems.append(f"{name} needs {req}: not installed")
            continue
        if not req.specifier.contains(have, prereleases=True):
            problems.append(f"{name} needs {req}: {have} is installed")
print("requirements:", "all met" if not problems else "; ".join(problems))

device = torch.device(sys.argv[2])
gpu = device.type == "cuda"
dtype = torch.bfloat16 if gpu else torch.float32
segment = torch.arange(128, device=device) // 27  # spans of 27 slots, the reference's mean span length
mask = (segment[:, None] == segment[None, :]).expand(64, 1, 128, 128)
q, k, v = (torch.randn(64, 12, 128, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    if gpu:
        torch.cuda.synchronize()
kind = torch.autograd.DeviceType.CUDA if gpu else torch.autograd.DeviceType.CPU
names = sorted({e.name for e in prof.events() if e.device_type == kind
                and any(w in e.name.lower() for w in ("attention", "fmha", "flash", "sdpa", "mha"))})
print("attention kernels:", "; ".join(n[:120] for n in names) or "none found")
sys.exit(1 if problems else 0)
EOF

remaining() { echo $((budget - (SECONDS - start))); }

# part NAME SECONDS CMD...: CMD under min(SECONDS, what is left of the budget); its output to the log and
# to results/NAME.txt.
part() {
    local name=$1 limit=$2
    shift 2
    local left
    left=$(remaining)
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, ${left}s of the budget left"
        failed+=("$name")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit}s; $(date -u +%T))"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$results/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0))s$([ "$rc" = 124 ] && echo ' (timed out)')"
    [ "$rc" = 0 ] || failed+=("$name")
    return "$rc"
}

echo "== 1. GPU tests (no compilation)"
part gpu_tests 140 "$py" -m pytest -q -m gpu tests/test_gpu.py -k "not compiled" -p no:cacheprovider

echo "== 2. step benchmark"
if [ "$dry" = 1 ]; then
    bench=(--device cpu --preset tiny --ref_docs 2 --our_docs 2,16 --steps 1 --cache_row --cache_chunk 8 --unfused_row
           --layouts=pack128,bucket-1)  # every kind of row the benchmark has, so the dry run checks them all
else
    bench=(--device cuda --our_docs 128,512,2048 --layouts=pack128 --cache_chunk 1024,2048)
fi
part step_throughput 210 "$py" benchmarks/step_throughput.py "${bench[@]}"
grep '^{' "$results/step_throughput.txt" | tail -n 1 > "$out/step_throughput.json"
compiled_ok=$("$py" - "$out/step_throughput.json" <<'EOF'
import json
import sys

try:
    rows = json.loads(open(sys.argv[1]).read())["rows"]
except (ValueError, KeyError, OSError):
    rows = []
print(int(any(r["style"] == "ours + torch.compile" and not r.get("failed") for r in rows)))
EOF
)

echo "== 3. the trainer at 2048 documents per step on one GPU"
if [ "$dry" = 1 ]; then
    sizes=(2 32 2 128) docs=16 steps=2 chunk=8 workers=0 skip_from=1
else
    sizes=(12 768 12 3072) docs=2048 steps=6 chunk=1024 workers=4 skip_from=6
fi
"$py" - "$dir/tokenizer" "$work/model" "${sizes[@]}" <<'EOF'
import sys

import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

tok = AutoTokenizer.from_pretrained(sys.argv[1])
layers, hidden, heads, inter = map(int, sys.argv[3:7])
torch.manual_seed(0)
cfg = BertConfig(vocab_size=len(tok), num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                 intermediate_size=inter)
BertForMaskedLM(cfg).save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
EOF

summarize_trainer() {
    "$py" - "$1" "$out/step_throughput.json" "$docs" <<'EOF'
"""The trainer's steady steps (the first holds CUDA start-up and kernel selection), against the benchmark's
eager row at the same batch."""
import json
import sys
from pathlib import Path

path = Path(sys.argv[1])
rows = [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line] if path.exists() else []
if not rows:
    print(f"trainer {path.parent.name}: no metrics")
    sys.exit()
steady = rows[1:] or rows
tok_s = sum(r["real_tokens_per_s"] for r in steady) / len(steady)
docs = int(sys.argv[3])
try:
    bench = json.loads(Path(sys.argv[2]).read_text())
    same = next(r for r in bench["rows"] if r["style"] == "ours" and r["docs"] == docs and not r.get("failed"))
    versus = f", {tok_s / same['real_tok_s']:.1%} of the benchmark's {same['real_tok_s']:,.0f} (same batch)"
except (ValueError, KeyError, OSError, StopIteration):
    versus = f", no benchmark row at {docs} documents to compare with"
print(f"trainer {path.parent.name}: steps {[r['step'] for r in rows]}, loss {rows[0]['loss']:.3f} -> "
      f"{rows[-1]['loss']:.3f}, s/step {sum(r['seconds_per_step'] for r in steady) / len(steady):.3f}, real tok/s "
      f"{tok_s:,.0f}{versus}, peak GiB {max(r.get('peak_memory_gib', 0) for r in rows):.1f}, mfu "
      f"{steady[-1].get('mfu')}")
EOF
}

train() {
    local mode=$1 limit=$2
    shift 2
    part "train_$mode" "$limit" "$py" -m accelerate.commands.launch --config_file "$launch_config" \
        coco_accel/train.py --model_name_or_path "$work/model" --train_dir "$dir/spans" \
        --output_dir "$work/train_$mode" --per_device_train_batch_size "$docs" --max_steps "$steps" --logging_steps 1 \
        --save_steps 0 --late_mlm --dataloader_drop_last --dataloader_num_workers "$workers" --learning_rate 1e-4 \
        --warmup_steps 1 --skip_from "$skip_from" --report_to none "$@"
    cp "$work/train_$mode/metrics.jsonl" "$results/train_$mode.metrics.jsonl" 2>/dev/null
    summarize_trainer "$work/train_$mode/metrics.jsonl"
}
train plain 90
train cached 90 --cache_chunk_size "$chunk"
if [ "$compiled_ok" = 1 ] && [ "$(remaining)" -gt 150 ]; then
    train compiled 90 --torch_compile
else
    echo "== train_compiled: skipped ($([ "$compiled_ok" = 1 ] && echo "$(remaining)s left" || echo 'the benchmark did not compile'))"
fi

echo "== 4. where the step's time goes"
if [ "$dry" = 1 ]; then
    part step_profile 60 "$py" benchmarks/step_profile.py --device cpu --preset tiny --docs 4 --reference --ref_docs 2
else
    part step_profile 90 "$py" benchmarks/step_profile.py --device cuda --reference
fi

echo "== done in $((SECONDS - start))s of ${budget}s; failed: ${failed[*]:-none}; files in $out: gpu_checks.log" \
    "step_throughput.json results.tar.gz"
exec >&- 2>&-
wait  # for the log's tee to write its last lines
[ ${#failed[@]} = 0 ]
