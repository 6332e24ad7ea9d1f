#!/usr/bin/env bash
# Everything that needs >= 2 GPUs (issues 3, 4, 5; 6 with NPROC=4/8), staged so each stage
# fits in one 10-minute device call. Run from the repo root with carry=[".whl"]:
#   STAGE=kernels bash scripts/multigpu_all.sh   # kernel tests (real processes) + kernel bench
#   STAGE=bench   bash scripts/multigpu_all.sh   # Qwen3-32B four-column tables + forced strategies
#   STAGE=check   bash scripts/multigpu_all.sh   # --check against eager / single-GPU reference
# Results (JSON/PNG/logs) go to $OUT; copy them to benchmarks/results/.
set -uo pipefail
OUT=${OUT:-/tmp/tdcompile_multigpu}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
NPROC=${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
if ls .whl/nvshmem4py*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/nvshmem4py*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
case ${STAGE:-kernels} in
  kernels) TEST_TIMEOUT=330 BENCH_TIMEOUT=200 OUT=$OUT bash scripts/gpu_check.sh all ;;
  bench)
    timeout 560 torchrun --nproc_per_node "$NPROC" -m tdcompile.bench --model qwen3-32b \
      --columns eager,inductor,async_tp,tdist,tdist:unfused,tdist:fused,tdist:sequence_parallel \
      --out "$OUT" 2>&1 | tee "$OUT/bench.log"
    for f in "$OUT"/bench-*.json; do python3 benchmarks/cost_model_accuracy.py "$f" | tee "$OUT/accuracy.txt"; done ;;
  check)
    timeout 560 torchrun --nproc_per_node "$NPROC" -m tdcompile.bench --model qwen3-32b --check --layers 8 \
      --out "$OUT" 2>&1 | tee "$OUT/check.log" ;;
esac
