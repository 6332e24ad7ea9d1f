#!/usr/bin/env bash
# On the GPU image (torch 2.11, Python 3.12): the CPU test suite under that torch (gloo,
# CUDA hidden) and a single-GPU calibration of the cost-model profile. Logs/JSON to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/tdcompile_compat}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)' | tee "$OUT/versions.txt"
timeout 150 python3 -m tdcompile calibrate --nproc 1 --out "$OUT/h100-calibrated.json" 2>&1 | tail -3
CUDA_VISIBLE_DEVICES= timeout "${SUITE_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider -x \
  tests/test_passes_all_reduce.py tests/test_passes_gather_scatter.py tests/test_passes_sequence_parallel.py tests/test_passes_pipeline.py tests/test_cost_model.py tests/test_e2e_tiny_qwen3.py 2>&1 | tee "$OUT/cpu_suite_torch211.log" | tail -25
