#!/usr/bin/env bash
# Issue 19's training-throughput check on a lent GPU: model FLOPs utilisation of gpt-base and retnet-base
# in bf16 at 2k and 16k context, against the chip's bf16 matmul rate measured in the same call (8192² matmul).
# Not run yet: no GPU has been lent to this issue. Writes under $OUT. Target: gpt-base at 2k >= 40% MFU.
set -euo pipefail
OUT=${OUT:-/tmp/issue19}
mkdir -p "$OUT"
common=(--device cuda --precision bfloat16 --matmul-size 8192 --warmup 3 --steps 10)
python -m scaleformer bench train "${common[@]}" --presets gpt-base --batch-size 8 --seq-len 2048 \
    --json "$OUT/train-gpt-2k.json" 2>&1 | tee "$OUT/train-gpt-2k.txt"
python -m scaleformer bench train "${common[@]}" --presets gpt-base --batch-size 1 --seq-len 16384 \
    --set max_positions=16384 --json "$OUT/train-gpt-16k.json" 2>&1 | tee "$OUT/train-gpt-16k.txt"
for backend in torch triton; do
  python -m scaleformer bench train "${common[@]}" --presets retnet-base --batch-size 8 --seq-len 2048 \
      --set retention_backend=$backend --json "$OUT/train-retnet-2k-$backend.json" 2>&1 | tee "$OUT/train-retnet-2k-$backend.txt"
  python -m scaleformer bench train "${common[@]}" --presets retnet-base --batch-size 1 --seq-len 16384 \
      --set retention_backend=$backend --json "$OUT/train-retnet-16k-$backend.json" 2>&1 | tee "$OUT/train-retnet-16k-$backend.txt"
done
