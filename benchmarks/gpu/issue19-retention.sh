#!/usr/bin/env bash
# Issue 19's GPU checks for the Triton chunkwise retention, as one prepared script for a lent GPU machine
# (see the device tool's METHOD.md). Not run yet: no GPU has been lent to this issue. Writes under $OUT.
# Needs: the repository installed (pip install -e .), triton, and flash-linear-attention's wheel carried
# to the machine (pip install --no-deps <wheel>) for the side-by-side columns.
set -euo pipefail
OUT=${OUT:-/tmp/issue19}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1. Correctness on the GPU: the same tests the CPU runs under the interpreter, now compiled for CUDA
#    (half-precision dot products are exercised only here).
python -m pytest -q -m triton tests/ops/test_retention_triton.py 2>&1 | tee "$OUT/tests.txt"
# 2. Forward+backward against fla and fused dense attention, per-head and gated decays, bf16 and fp32.
for dtype in bfloat16 float32; do
  for decay in head token; do
    python -m scaleformer bench retention --device cuda --dtype "$dtype" --decay "$decay" \
        --backends torch triton fla --lengths 2048 4096 16384 65536 --heads 8 --head-dim 128 \
        --chunk-size 64 --presets --contexts 512 --repeats 5 \
        --json "$OUT/retention-$dtype-$decay.json" 2>&1 | tee "$OUT/retention-$dtype-$decay.txt"
  done
done
