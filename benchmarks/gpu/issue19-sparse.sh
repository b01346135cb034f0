#!/usr/bin/env bash
# Issue 19's GPU checks for the block-sparse Triton attention (dilated and S2), as one prepared script for a
# lent GPU machine (see the device tool's METHOD.md). Not run yet: no GPU has been lent to this issue.
# Writes under $OUT. Needs the repository installed (pip install -e .) and triton.
set -euo pipefail
OUT=${OUT:-/tmp/issue19}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1. Correctness on the GPU: the interpreter's tests compiled for CUDA (tile 64 and half-precision dot
#    products are exercised only here).
python -m pytest -q -m triton tests/ops/test_block_sparse_triton.py 2>&1 | tee "$OUT/sparse-tests.txt"
# 2. Dilated (LongNet's patterns) and S2 (Phi-3-small's layout) against fused dense attention, 8k-64k,
#    forward+backward, the PyTorch paths and the Triton kernel side by side. Target: dilated bf16 at 32k
#    >= 8x dense.
for dtype in bfloat16 float32; do
  python -m scaleformer bench sparse --device cuda --dtype "$dtype" --lengths 8192 16384 32768 65536 \
      --heads 16 --head-dim 64 --repeats 5 --json "$OUT/sparse-$dtype.json" 2>&1 | tee "$OUT/sparse-$dtype.txt"
done
