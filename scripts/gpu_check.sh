#!/usr/bin/env bash
# ONE script for the GPU machine (run from the repo root, e.g. through the device tool with
# carry=[".whl"]): installs the carried nvshmem4py wheel, runs the GPU tests (simulated ranks
# on 1 GPU; real multi-process tests when >= 2 GPUs) and the kernel benchmark, writing logs
# and JSON under $OUT.   Usage: scripts/gpu_check.sh [tests|bench|all] (default all)
set -uo pipefail
OUT=${OUT:-/tmp/tdcompile_gpu_check}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo
STAGE=${1:-all}
if ls .whl/nvshmem4py*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/nvshmem4py*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "gpus", torch.cuda.device_count())'
  timeout 60 python3 scripts/nvshmem_smoke.py 2>&1 | tail -5
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"
rc=0
if [[ $STAGE == tests || $STAGE == all ]]; then
  TDCOMPILE_SPIN_TIMEOUT_S=${TDCOMPILE_SPIN_TIMEOUT_S:-3} timeout "${TEST_TIMEOUT:-360}" \
    python3 -m pytest -q -rs -p no:cacheprovider tests/gpu ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
fi
if [[ $STAGE == bench || $STAGE == all ]]; then
  if (( NGPU >= 2 )); then
    timeout "${BENCH_TIMEOUT:-300}" torchrun --nproc-per-node 2 benchmarks/bench_kernels.py ${BENCH_ARGS:-} \
      --out "$OUT/bench_real2.json" 2>&1 | tee "$OUT/bench_real.log"
  fi
  timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_kernels.py --sim 2 ${BENCH_ARGS:-} \
    --out "$OUT/bench_sim2.json" 2>&1 | tee "$OUT/bench_sim.log"
fi
exit $rc
