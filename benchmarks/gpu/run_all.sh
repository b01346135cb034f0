#!/usr/bin/env bash
# Issue 39's prepared GPU run: every Triton kernel checked on the GPU, then timed beside fla and SDPA's
# flash kernel, then training throughput and MFU, in one command of at most 8 minutes on a lent H100/H200.
#
#   bash benchmarks/gpu/run_all.sh smoke   # ~2 min: the environment, and each kernel compiled once, tiny
#   bash benchmarks/gpu/run_all.sh         # the full run (a time budget of 450 s; later steps are skipped,
#                                          # and said so, when it runs out)
#   bash benchmarks/gpu/run_all.sh dry     # on a CPU: every step's code path at tiny sizes, the Triton
#                                          # kernels under the interpreter (tests/bench/test_gpu_script.py)
#
# The machine reaches no registry: flash-linear-attention travels as wheels in .whl/ (see the device
# tool's README: `pip download --no-deps ... -d .whl flash-linear-attention fla-core`, then carry .whl);
# without them the fla columns are left out, said in the log. The repository is used from src/ (no
# install). Everything is written to a scratch folder and packed into $OUT/issue39-results.tar.gz, with
# $OUT/summary.txt beside it (the device returns at most 8 files). Exit status: the number of failed
# steps (0 = every step ran and every kernel check passed).
set -uo pipefail
MODE=${1:-full}
case "$MODE" in full | smoke | dry) ;; *) echo "usage: run_all.sh [full|smoke|dry]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/issue39}
WORK=$(mktemp -d)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
case "$MODE" in full) BUDGET=450 ;; smoke) BUDGET=110 ;; dry) BUDGET=600 ;; esac
failures=0

finish() {
  echo "mode $MODE: $failures failed step(s), $SECONDS s" | tee -a "$WORK/summary.txt"
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  tar -czf "$OUT/issue39-results.tar.gz" -C "$WORK" .
}
trap finish EXIT

# step NAME LIMIT COMMAND...: runs COMMAND with at most LIMIT seconds (less if the budget is nearly spent),
# its output in NAME.log (the tail echoed), its exit status in summary.txt.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "-- $name: skipped, the time budget is spent ($SECONDS of $BUDGET s)" | tee -a "$WORK/summary.txt"
    failures=$((failures + 1))
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  echo "== $name (at most $limit s)"
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$WORK/$name.log"
  echo "-- $name: exit $rc after $((SECONDS - start)) s" | tee -a "$WORK/summary.txt"
  [ "$rc" -ne 0 ] && failures=$((failures + 1))
  return 0
}

ENVIRONMENT='
import importlib, shutil, subprocess, torch
if shutil.which("nvidia-smi"):
    subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], check=False)
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
for name in ("triton", "scaleformer", "fla"):  # fla is optional; the others are not (the next steps say so)
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), "from", module.__file__)
    except Exception as error:
        print(name, "missing:", error)
'

if [ "$MODE" = dry ]; then
  export TRITON_INTERPRET=1
  DEV=cpu
  FLA=""
else
  DEV=cuda
  FLA=$($PY -c "import fla.ops.retention, fla.ops.gated_delta_rule; print('fla')" 2>/dev/null || true)
  [ -z "$FLA" ] && echo "flash-linear-attention is not importable: its columns are left out" | tee -a "$WORK/summary.txt"
fi

step environment 60 $PY -c "$ENVIRONMENT"

if [ "$MODE" = smoke ]; then
  step kernels-tiny 90 $PY -m scaleformer bench kernels --size tiny --device cuda --dtypes float32 bfloat16 --json "$WORK/kernels-tiny.json"
  exit "$failures"
fi

# 1. Correctness: each kernel forward and backward against its float64 reference, fp32 and bf16.
if [ "$MODE" = dry ]; then
  step kernels 120 $PY -m scaleformer bench kernels --size tiny --device cpu --dtypes float32 --json "$WORK/kernels.json"
else
  step kernels 150 $PY -m scaleformer bench kernels --size full --device cuda --json "$WORK/kernels.json"
fi

# 2. Kernel time side by side (bf16, forward+backward). fla's shapes: B=4, H=8; D=256 for retention.
if [ "$MODE" = dry ]; then
  op=(--device cpu --dtype float32 --batch 2 --heads 2 --lengths 64)
  step retention-head 120 $PY -m scaleformer bench retention "${op[@]}" --head-dim 16 --chunk-size 16 --decay head \
    --backends torch triton --presets --contexts --repeats 1 --json "$WORK/retention-head.json"
  step retention-gated 120 $PY -m scaleformer bench retention "${op[@]}" --head-dim 16 --chunk-size 16 --decay token \
    --backends torch triton --presets --contexts --repeats 1 --json "$WORK/retention-gated.json"
  step delta 120 $PY -m scaleformer bench delta "${op[@]}" --head-dim 16 --chunk-size 16 --backends torch triton \
    --recurrent-max 0 --rounds 5 --json "$WORK/delta.json"
  step sparse 120 $PY -m scaleformer bench sparse --device cpu --dtype float32 --lengths 256 --max-dense 256 --heads 2 \
    --head-dim 16 --segments 64 128 256 --rates 1 2 4 --block 16 --local-blocks 2 --vert-stride 4 \
    --kernels auto triton --repeats 1 --json "$WORK/sparse.json"
else
  op=(--device cuda --dtype bfloat16 --batch 4 --heads 8)
  step retention-head 75 $PY -m scaleformer bench retention "${op[@]}" --head-dim 256 --decay head --backends torch triton $FLA \
    --lengths 1024 2048 4096 8192 16384 --presets --contexts --repeats 5 --json "$WORK/retention-head.json"
  step retention-gated 75 $PY -m scaleformer bench retention "${op[@]}" --head-dim 256 --decay token --backends torch triton $FLA \
    --lengths 1024 2048 4096 8192 16384 --presets --contexts --repeats 5 --json "$WORK/retention-gated.json"
  step delta 75 $PY -m scaleformer bench delta "${op[@]}" --head-dim 128 --backends torch triton $FLA \
    --lengths 2048 4096 8192 16384 --recurrent-max 0 --rounds 5 --json "$WORK/delta.json"
  step sparse 75 $PY -m scaleformer bench sparse --device cuda --dtype bfloat16 --lengths 8192 16384 32768 65536 --heads 16 \
    --head-dim 64 --kernels auto triton --repeats 5 --json "$WORK/sparse.json"
fi

# 3. Training throughput and MFU in bf16 against the matmul rate measured in the same call.
if [ "$MODE" = dry ]; then
  train=(--device cpu --precision float32 --matmul-size 256 --warmup 1 --steps 1 --batch-size 2 --seq-len 64)
  step train-gpt 120 $PY -m scaleformer bench train "${train[@]}" --presets gpt-tiny --json "$WORK/train-gpt.json"
  step train-retnet 120 $PY -m scaleformer bench train "${train[@]}" --presets retnet-tiny --set retention_backend=triton \
    --json "$WORK/train-retnet.json"
  step train-gdn 120 $PY -m scaleformer bench train "${train[@]}" --presets gdn-tiny gdn-hybrid-tiny --set backend=triton \
    --json "$WORK/train-gdn.json"
else
  for length in 2048 8192; do
    batch=$((16384 / length))
    train=(--device cuda --precision bfloat16 --matmul-size 8192 --warmup 3 --steps 10 --batch-size $batch
           --seq-len $length)
    step "train-gpt-$length" 45 $PY -m scaleformer bench train "${train[@]}" --presets gpt-base --set max_positions=$length \
      --json "$WORK/train-gpt-$length.json"
    step "train-retnet-$length" 45 $PY -m scaleformer bench train "${train[@]}" --presets retnet-base --set retention_backend=triton \
      --json "$WORK/train-retnet-$length.json"
    step "train-gdn-$length" 60 $PY -m scaleformer bench train "${train[@]}" --presets gdn-base gdn-hybrid-base --set backend=triton \
      --json "$WORK/train-gdn-$length.json"
  done
fi

# 4. The interpreter tier's tests, compiled for the GPU (odd lengths, chunk sizes, whole models), as time allows;
#    with 2+ GPUs, context parallelism under NCCL. On a CPU these are CI's own tiers.
if [ "$MODE" = full ]; then
  step triton-tests 120 $PY -m pytest -q -m triton -p no:cacheprovider tests/ops/test_retention_triton.py \
    tests/ops/test_delta_rule_triton.py tests/ops/test_block_sparse_triton.py
  if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    step distributed 90 $PY -m pytest -q -m distributed -p no:cacheprovider tests/parallel/test_context_parallel.py
  fi
fi
exit "$failures"
