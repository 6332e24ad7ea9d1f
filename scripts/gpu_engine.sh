#!/usr/bin/env bash
# TP=1 validation of the Engine and the benchmark on ONE GPU (run by the device tool):
#   Qwen3-32B dimensions with a reduced layer count, bf16, random weights.
#   1. bench --check: tdist vs eager vs single-device reference (fp32 softmax, 2e-2)
#   2. generate: eager / tdist Engine, CUDA-graph decode, tokens/s; top-p sampling
#   3. bench: the seed's cases (async TP is n/a at world 1; TP=2 rows are pending a 2-GPU machine)
# Writes logs, JSON and PNG to $OUT (default benchmarks/results). ~6 minutes on an H100.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
GEN_LAYERS=${GEN_LAYERS:-4}
CHECK_LAYERS=${CHECK_LAYERS:-4}
BENCH_LAYERS=${BENCH_LAYERS:-2}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"
PY=${PY:-python3}
cd "$(dirname "$0")/.."

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/env.log"
$PY -c "import torch, transformers, triton, sys; print(sys.version.split()[0], torch.__version__, \
transformers.__version__, triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/env.log"

timeout 110 $PY -m tdcompile.bench --check --model qwen3-32b --layers "$CHECK_LAYERS" --check-batch 4 \
  --out "$OUT" 2>&1 | grep -v "tensor/s\]" | tee "$OUT/check.log" || echo "check FAILED"

{
  for be in eager tdist; do
    echo "== generate backend=$be layers=$GEN_LAYERS"
    timeout 100 $PY -m tdcompile.generate --model qwen3-32b --layers "$GEN_LAYERS" --backend "$be" \
      --batch 128 --prompt-len 128 --new-tokens 32 --repeat 2 || echo "generate $be FAILED rc=$?"
  done
  echo "== generate top-p (eager, CUDA graph)"
  timeout 60 $PY -m tdcompile.generate --model qwen3-32b --layers 2 --backend eager --batch 4 \
    --prompt-len 16 --new-tokens 16 --temperature 0.6 --top-p 0.95 || echo "top-p FAILED rc=$?"
} 2>&1 | grep -v "it/s\]\|tensor/s\]" | tee "$OUT/generate.log"

timeout ${BENCH_TIMEOUT:-270} $PY -m tdcompile.bench --model qwen3-32b --layers "$BENCH_LAYERS" --out "$OUT" 2>&1 \
  | grep -v "tensor/s\]" | tee "$OUT/bench.log" || echo "bench FAILED"
ls -la "$OUT"
