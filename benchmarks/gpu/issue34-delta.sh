#!/usr/bin/env bash
# Issue 34's GPU checks for the Triton chunkwise delta rule, as one prepared script for a lent GPU machine
# (see the device tool's README). Not run yet: no GPU has been lent to this issue. Writes under $OUT.
# Needs: the repository installed (pip install -e .), triton (it comes with CUDA torch), and for the
# side-by-side column flash-linear-attention (pip install flash-linear-attention; skipped if absent).
# About 3 minutes on an H100: the tests, then 2 dtypes x 5 lengths x 5 rounds.
set -euo pipefail
OUT=${OUT:-/tmp/issue34}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1. Correctness on the GPU: the tier the CPU runs under the interpreter, compiled for CUDA.
python -m pytest -q -m triton tests/ops/test_delta_rule_triton.py 2>&1 | tee "$OUT/tests.txt"
# 2. Forward+backward: the PyTorch chunkwise form, our kernel and fla's chunk_gated_delta_rule, and SDPA.
backends="torch triton"
python -c "import fla.ops.gated_delta_rule" 2>/dev/null && backends="$backends fla"
for dtype in bfloat16 float32; do
  python -m scaleformer bench delta --device cuda --dtype "$dtype" --backends $backends \
      --lengths 2048 4096 8192 16384 32768 --heads 8 --head-dim 128 --chunk-size 64 --recurrent-max 0 \
      --rounds 5 --json "$OUT/delta-$dtype.json" 2>&1 | tee "$OUT/delta-$dtype.txt"
done
