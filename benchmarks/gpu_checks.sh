#!/usr/bin/env bash
# Every GPU check in one go (about 9 minutes on one H100/H200 with the defaults, the compiled GPU tests included;
# TRAIN_MODES="plain compiled" and PROFILE_COMPILE= save about 2):
#   1. benchmarks/step_throughput.py on BERT-base: reference style vs ours at 128, 512 and 2048
#      documents per step (LAYOUTS: packed rows, length groups), gradient caching, torch.compile
#      (COMPILE=--no-compile leaves it out); then benchmarks/step_profile.py: the step's time by kind
#      of kernel, eager and compiled, and the reference's (PROFILE=0 skips it, PROFILE_COMPILE= keeps
#      it eager);
#   2. the real trainer (accelerate launch, data loader, collator, optimizer) on ONE GPU at the
#      paper's 2048-document global batch, BERT-base from a config (TRAIN_MODES: plain, gradient-cached,
#      torch.compile);
#   3. the GPU-only tests (fp16 loss scaling, bf16; NCCL when there are two GPUs).
#
#   benchmarks/gpu_checks.sh OUT_DIR SPAN_DATA TOKENIZER_DIR
#
# SPAN_DATA: a preprocessed dataset with at least 2048 documents; TOKENIZER_DIR: a BERT uncased
# WordPiece tokenizer folder (no weights needed). Logs and metrics land in OUT_DIR; big files
# (the BERT-base folder, exports) stay under ${TMPDIR:-/tmp}.
set -uo pipefail
out=${1:?OUT_DIR}
data=${2:?SPAN_DATA}
tok=${3:?TOKENIZER_DIR}
py=${PYTHON:-python3}
work=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # runs from a checkout, installed or not
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch, transformers, accelerate, datasets; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)" | tee -a "$out/gpu.txt"

echo "== 1. step benchmark"
$py benchmarks/step_throughput.py --device cuda --our_docs ${DOCS:-128,512,2048} \
    --layouts=${LAYOUTS:-pack128,pack256,bucket-1} --cache_chunk ${CHUNKS:-1024,2048} ${COMPILE:-} \
    2>&1 | tee "$out/step_throughput.txt"

echo "== 1b. where the step's time goes (PROFILE=0 skips; the compiled profile compiles for about a minute)"
if [ "${PROFILE:-1}" != 0 ]; then
    $py benchmarks/step_profile.py --device cuda --reference ${PROFILE_COMPILE---compile} 2>&1 | tee "$out/step_profile.txt"
fi

echo "== 2. the trainer at 2048 documents per step on one GPU"
$py - "$tok" "$work/bert-base" <<'EOF'
import sys
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

tok = AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(0)
BertForMaskedLM(BertConfig(vocab_size=len(tok))).save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
EOF
modes=(${TRAIN_MODES:-plain compiled cached})
for mode in "${modes[@]}"; do
    extra=()
    [ "$mode" = cached ] && extra=(--cache_chunk_size 1024)
    [ "$mode" = compiled ] && extra=(--torch_compile)
    $py -m accelerate.commands.launch --config_file accelerate_configs/single_gpu.yaml coco_accel/train.py \
        --model_name_or_path "$work/bert-base" --train_dir "$data" --output_dir "$work/train_$mode" \
        --per_device_train_batch_size 2048 --max_steps 5 --logging_steps 1 --save_steps 0 --late_mlm \
        --dataloader_drop_last --dataloader_num_workers 4 --learning_rate 1e-4 --warmup_steps 1 \
        --report_to none "${extra[@]}" > "$out/train_$mode.log" 2>&1 || tail -n 20 "$out/train_$mode.log"
    cp "$work/train_$mode/metrics.jsonl" "$out/train_$mode.metrics.jsonl" 2>/dev/null
done
$py - "$out" "${modes[@]}" <<'EOF'
import json, sys
from pathlib import Path

for mode in sys.argv[2:]:
    path = Path(sys.argv[1]) / f"train_{mode}.metrics.jsonl"
    if not path.exists():
        print(f"trainer {mode}: no metrics")
        continue
    rows = [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]
    # the first step includes CUDA start-up and kernel selection (and compilation)
    steady = rows[1:] or rows
    print(f"trainer {mode}: steps {[r['step'] for r in rows]}, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
          f"s/step {sum(r['seconds_per_step'] for r in steady) / len(steady):.3f}, real tok/s "
          f"{sum(r['real_tokens_per_s'] for r in steady) / len(steady):,.0f}, peak GiB "
          f"{max(r.get('peak_memory_gib', 0) for r in rows):.1f}, each step (s) "
          f"{[round(r['seconds_per_step'], 3) for r in rows]}")
EOF


echo "== 3. GPU tests"
COCO_ACCEL_TEST_TOKENIZER="$tok" $py -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 \
    | tee "$out/test_gpu.txt"
rm -rf "$work"
