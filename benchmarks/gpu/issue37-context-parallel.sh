#!/usr/bin/env bash
# Issue 37's GPU run of context parallelism, as one prepared script for a lent GPU machine. Not run yet: no
# GPU has been lent to this issue. With 2+ GPUs the ranks talk over NCCL (one GPU each); with one, over
# gloo through host memory (the exactness tests still hold; the timings then say little). Writes under $OUT.
# Needs the repository installed (pip install -e ".[test]").
set -euo pipefail
OUT=${OUT:-/tmp/issue37}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
gpus=$(nvidia-smi --list-gpus | wc -l)
# 1. Exactness, as on the CPU (gloo, float64): every mixer and the hybrid presets split across 2 and 4 ranks.
python -m pytest -q -m distributed tests/parallel/test_context_parallel.py 2>&1 | tee "$OUT/tests.txt"
# 2. Bytes per rank, activation memory and time against one GPU, bf16-free fp32, 16k-64k tokens.
worlds=2; [ "$gpus" -ge 4 ] && worlds="2 4"
python -m scaleformer bench context-parallel --device cuda --worlds $worlds --embed-dim 1024 --layers 8 \
    --heads 8 --lengths 4096 16384 65536 --long 262144 --long-models retnet mamba2 gdn --repeats 5 \
    --json "$OUT/context-parallel-cuda.json" 2>&1 | tee "$OUT/context-parallel-cuda.txt"
