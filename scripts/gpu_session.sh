#!/usr/bin/env bash
# The multi-GPU session script, staged so each stage fits one 10-minute device call (run from
# the repo root through the device tool with carry=[".whl"]; results land in $OUT):
#   STAGE=prep  bash scripts/gpu_session.sh   # GPU tests (kernels, real processes, fault injection),
#                                             # all-reduce bench, measured table (calibrate --ship)
#   STAGE=bench bash scripts/gpu_session.sh   # measured table (instant when shipped) + E2E bench:
#                                             # eager, inductor, async-TP, bound, tdist in ONE run
#   STAGE=all   bash scripts/gpu_session.sh   # real-process tests, [all-reduce bench], calibrate,
#                                             # inspect (report with measured candidates), bench
#   STAGE=full  bash scripts/gpu_session.sh   # one call: new kernels' simulated tests (a failing one is
#                                             # left out of auto), real-process tests (failing: NEW_CANDIDATES
#                                             # are left out), all-reduce bench, calibrate (SP=1: with the
#                                             # sequence-parallel keys), bench (given what is left of DEADLINE s)
#   STAGE=gemm  bash scripts/gpu_session.sh   # one GPU: GEMM alone (cuBLAS, pointer, TMA configs) + TMA tests
#   STAGE=tma   bash scripts/gpu_session.sh   # AG-GEMM / GEMM-RS on the TMA GEMM: tests, then every variant side by side
# REUSE=1: calibrate keeps shipped entries whose code is unchanged and measures only the stale or
# missing candidates (e.g. host entries after a change to the op dispatch path): seconds, not minutes.
set -uo pipefail
OUT=${OUT:-/tmp/tdcompile_gpu}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo
if ls .whl/nvshmem4py*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/nvshmem4py*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
NP=${NP:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
LOG=$OUT/session-$STAGE.log
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } >>"$LOG" 2>&1
CASES=${CASES:-"=MLP M=128,=MLP M=4096,=attn prefill bsz=32 ctx=128,=attn decode bsz=128 ctx=128,=E2E prefill 32x128,=E2E decode bsz=128"}
step() { local t=$1; shift; echo "== $(date +%T) $*" | tee -a "$LOG"; timeout "$t" "$@" 2>&1 | tee -a "$LOG" | tail -${TAIL:-25}; }
calibrate() {
  local NP=${NP}
  TDCOMPILE_SPIN_TIMEOUT_S=5 step "${CAL_T:-240}" torchrun --nproc_per_node "$NP" -m tdcompile calibrate \
    --model qwen3-32b --rows "${MS:-128,4096}" ${SP:+--sp} ${REUSE:+--reuse} --ship --report "$OUT/calibrate-tp$NP.json" --out "$OUT/profile-tp$NP.json"
  cp tdcompile/profiles/measured/*w"$NP"*.json "$OUT/" 2>/dev/null
}
inspect() {   # the report on a GPU: every match with its candidates' measured microseconds
  step "${INSPECT_T:-150}" torchrun --nproc_per_node "$NP" -m tdcompile inspect --model qwen3-32b --layers 2 \
    --batch 32 --seq 128 --json "$OUT/inspect-tp$NP.json"
}
bench() {   # TRACE=tdist,bound: torch.profiler traces of those columns per row (into the tarball)
  step "${BENCH_T:-420}" torchrun --nproc_per_node "$NP" -m tdcompile.bench --model qwen3-32b --layers 8 \
    --iters "${ITERS:-40}" --columns "${COLUMNS:-eager,inductor,inductor_again,async_tp,bound,tdist}" --cases "$CASES" \
    --out "$OUT" ${TRACE:+--trace "$TRACE"} ${ROUNDS:+--rounds "$ROUNDS"}
}
START=$SECONDS
left() { echo $(( ${DEADLINE:-570} - (SECONDS - START) )); }
gate() {   # gate "<tests>" "<op/impl,...>": the candidates leave auto when their GPU tests fail
  TDCOMPILE_SPIN_TIMEOUT_S=5 step "${SIM_T:-120}" python3 -m pytest -q -rs -p no:cacheprovider -m gpu $1 \
    || { SKIPS="${SKIPS:+$SKIPS,}$2"; echo "== leaving out of auto: $2" | tee -a "$LOG"; }
}
opg_gate() {   # replayed op graphs (ops/op_graphs.py): their real-process test gates them
  TDCOMPILE_SPIN_TIMEOUT_S=5 step "${OPG_T:-200}" python3 -m pytest -q -rs -s -p no:cacheprovider -m multigpu \
    tests/gpu/test_op_graphs_real.py || { export TDCOMPILE_OP_GRAPHS=0
      echo "== op graph tests failed: replays off (TDCOMPILE_OP_GRAPHS=0)" | tee -a "$LOG"; }
}
case ${STAGE:-prep} in
  full)
    SKIPS=${TDCOMPILE_SKIP_CANDIDATES:-}
    if [[ -z ${SKIP_GATE:-} ]]; then   # SKIP_GATE=all: the copy-engine gates too
      gate tests/gpu/test_all_reduce_rmsnorm_lamport.py all_reduce_rmsnorm/fused:lamport
      gate tests/gpu/test_gemm_all_reduce_ce.py gemm_all_reduce/fused:ce2,gemm_all_reduce/fused:ce4
    fi
    if [[ ${SKIP_GATE:-} != all ]]; then
      gate tests/gpu/test_all_gather_gemm_ce.py all_gather_gemm/fused:ce
      gate tests/gpu/test_gemm_reduce_scatter_ce.py gemm_reduce_scatter/fused:ce
    fi
    if [[ -z ${SKIP_L2:-} ]]; then   # SKIP_L2=1: lamport2's own gates already passed on this code
      gate tests/gpu/test_all_reduce_rmsnorm_lamport2.py all_reduce_rmsnorm/fused:lamport2
      gate "tests/gpu/test_all_reduce_lamport2.py tests/gpu/test_all_reduce_lamport.py -k lamport2" fused:lamport2
      [[ ,$SKIPS, == *,fused:lamport2,* ]] || TDCOMPILE_SPIN_TIMEOUT_S=5 step "${TEST_T:-150}" python3 -m pytest -q -rs \
        -p no:cacheprovider -m multigpu tests/gpu/test_all_reduce_lamport2.py \
        || { SKIPS="${SKIPS:+$SKIPS,}fused:lamport2"; echo "== leaving out of auto: fused:lamport2" | tee -a "$LOG"; }
    fi
    export TDCOMPILE_SKIP_CANDIDATES=$SKIPS
    if [[ -n ${OPG:-} ]]; then   # replayed op graphs (ops/op_graphs.py): their real-process test gates them
      opg_gate
    fi
    TDCOMPILE_SPIN_TIMEOUT_S=5 step "${TEST_T:-150}" python3 -m pytest -q -rs -p no:cacheprovider -m multigpu \
      ${MG_TESTS:-tests/gpu/test_multigpu.py::test_every_family_runs_and_matches_unfused} \
      || { export TDCOMPILE_SKIP_CANDIDATES="${TDCOMPILE_SKIP_CANDIDATES:+$TDCOMPILE_SKIP_CANDIDATES,}${NEW_CANDIDATES:-}"
           echo "== family test failed: leaving out of auto: ${NEW_CANDIDATES:-nothing named}" | tee -a "$LOG"; }
    [[ -n ${SKIP_ARB:-} ]] || step 90 torchrun --nproc_per_node "$NP" benchmarks/bench_all_reduce.py --out "$OUT"
    calibrate
    if [[ -n ${CAL2:-} && $NP -gt 2 ]]; then   # the W=2 table too, on the first two GPUs of this host
      CUDA_VISIBLE_DEVICES=0,1 NP=2 calibrate
    fi
    BENCH_T=$(left) bench ;;
  prep)
    TDCOMPILE_SPIN_TIMEOUT_S=5 step "${TEST_T:-230}" python3 -m pytest -q -rs -p no:cacheprovider \
      tests/gpu/test_all_reduce_kernels.py tests/gpu/test_all_reduce_lamport.py tests/gpu/test_all_reduce_rmsnorm_lamport.py \
      tests/gpu/test_gemm_all_reduce_ce.py \
      tests/gpu/test_multigpu.py
    [[ -n ${SKIP_ARB:-} ]] || step 150 torchrun --nproc_per_node "$NP" benchmarks/bench_all_reduce.py --out "$OUT"
    calibrate ;;
  bench)    # PRE_CASES: those rows first (inductor, tdist), before calibrate: keys missing from or stale in
            # the table are then measured while compiling (the path a user's first compile takes)
    if [[ -n ${PRE_CASES:-} ]]; then
      CASES=$PRE_CASES COLUMNS=inductor,tdist BENCH_T=${PRE_T:-150} bench
    fi
    calibrate
    if [[ -n ${CAL2:-} && $NP -gt 2 ]]; then   # the W=2 table too, on the first two GPUs of this host
      CUDA_VISIBLE_DEVICES=0,1 NP=2 calibrate
    fi
    BENCH_T=$(left) bench ;;
  arb)      # all-reduce kernel bench only (AR_ROWS rows x 5120)
    step "${ARB_T:-200}" torchrun --nproc_per_node "$NP" benchmarks/bench_all_reduce.py --out "$OUT" \
      --rows "${AR_ROWS:-128,4096}" ;;
  hostprof) # where the host time of an op call goes (scripts/host_profile.py), at W=NP and W=2
    step "${HP_T:-180}" torchrun --nproc_per_node "$NP" scripts/host_profile.py --out "$OUT"
    if [[ $NP -gt 2 ]]; then CUDA_VISIBLE_DEVICES=0,1 step "${HP_T:-180}" torchrun --nproc_per_node 2 \
      scripts/host_profile.py --out "$OUT"; fi ;;
  opg)      # op graphs gated by their real-process test (and the family test), tables at W=NP and W=2,
            # rows at TP=NP, then rows at TP=2 on GPUs 0,1 (CASES2, COLUMNS2); SKIP_OPG=1: no gate
    SKIPS=${TDCOMPILE_SKIP_CANDIDATES:-}
    if [[ -n ${CE_GATE:-} ]]; then   # CE_GATE=1: the copy-engine GEMM + all-reduce's simulated-rank tests gate its candidates
      gate tests/gpu/test_gemm_all_reduce_ce.py gemm_all_reduce/fused:ce2,gemm_all_reduce/fused:ce4
    fi
    if [[ -n ${CHAIN_GATE:-} ]]; then   # CHAIN_GATE=1: the chain GEMM + all-reduce's simulated-rank tests gate it
      gate tests/gpu/test_gemm_all_reduce_chain.py gemm_all_reduce/fused:chain2,gemm_all_reduce/fused:chain4
    fi
    export TDCOMPILE_SKIP_CANDIDATES=$SKIPS
    [[ -n ${SKIP_OPG:-} ]] || opg_gate
    # MG_TESTS (real processes) failing: NEW_CANDIDATES leave auto if named, else replays go off
    [[ -z ${MG_TESTS:-} ]] || TDCOMPILE_SPIN_TIMEOUT_S=5 step "${TEST_T:-150}" python3 -m pytest -q -rs -p no:cacheprovider \
      -m multigpu $MG_TESTS || if [[ -n ${NEW_CANDIDATES:-} ]]; then
        export TDCOMPILE_SKIP_CANDIDATES="${TDCOMPILE_SKIP_CANDIDATES:+$TDCOMPILE_SKIP_CANDIDATES,}$NEW_CANDIDATES"
        echo "== family test failed: leaving out of auto: $NEW_CANDIDATES" | tee -a "$LOG"
      else export TDCOMPILE_OP_GRAPHS=0; echo "== family test failed: replays off" | tee -a "$LOG"; fi
    calibrate
    [[ $NP -gt 2 ]] && CUDA_VISIBLE_DEVICES=0,1 NP=2 calibrate
    BENCH_T=$(( $(left) - ${TP2_T:-0} )) bench
    if [[ $NP -gt 2 && -n ${CASES2:-} ]]; then
      CUDA_VISIBLE_DEVICES=0,1 NP=2 CASES=$CASES2 COLUMNS=${COLUMNS2:-inductor,tdist} BENCH_T=$(left) bench
    fi ;;
  probe)    # scripts/overlap_probe.py (the copy-engine GEMM + all-reduce's pieces) at W=NP and W=2,
            # then, with ROWS=1, the rows in CASES (bench)
    # PROBE_TRACE=eq4: also a profiler trace of ce with that split per rank (scripts/trace_summary.py reads them)
    TDCOMPILE_SPIN_TIMEOUT_S=10 step "${PROBE_T:-150}" torchrun --nproc_per_node "$NP" scripts/overlap_probe.py --out "$OUT" \
      ${PROBE_TRACE:+--trace "$PROBE_TRACE"}
    if [[ $NP -gt 2 ]]; then CUDA_VISIBLE_DEVICES=0,1 TDCOMPILE_SPIN_TIMEOUT_S=10 step "${PROBE_T:-150}" \
      torchrun --nproc_per_node 2 scripts/overlap_probe.py --out "$OUT" ${PROBE_TRACE:+--trace "$PROBE_TRACE"}; fi
    [[ -z ${ROWS:-} ]] || BENCH_T=$(left) bench ;;
  chaintrace)   # scripts/chain_trace.py on GPUs 0,1: one profiled chain2 call per rank, o_proj then down_proj
    for k in 4096 12800; do CUDA_VISIBLE_DEVICES=0,1 TDCOMPILE_SPIN_TIMEOUT_S=10 step "${CT_T:-120}" \
      torchrun --nproc_per_node 2 scripts/chain_trace.py --out "$OUT/k$k" --k $k; done ;;
  gemm)     # ONE GPU: benchmarks/bench_gemm.py (cuBLAS vs pointer vs TMA GEMM), then the TMA GEMM's tests
    step "${GEMM_T:-300}" python3 benchmarks/bench_gemm.py --out "$OUT" ${GEMM_ARGS:-}
    TDCOMPILE_SPIN_TIMEOUT_S=5 step "${SIM_T:-240}" python3 -m pytest -q -rs -p no:cacheprovider -m gpu \
      tests/gpu/test_gemm_tma.py ;;
  tma)      # the fused ops on the TMA GEMM: their tests (one GPU, then real processes; a failing file is named in
            # the log), then every variant side by side (benchmarks/bench_tma_ops.py) at W=NP and W=2 on GPUs 0,1
    TDCOMPILE_SPIN_TIMEOUT_S=5 step "${SIM_T:-240}" python3 -m pytest -q -rs -p no:cacheprovider -m "gpu or multigpu" \
      tests/gpu/test_gemm_tma.py tests/gpu/test_gemm_reduce_scatter_tma.py
    step "${TMA_T:-180}" torchrun --nproc_per_node "$NP" benchmarks/bench_tma_ops.py --out "$OUT" ${TMA_ARGS:-}
    if [[ $NP -gt 2 ]]; then CUDA_VISIBLE_DEVICES=0,1 step "${TMA_T:-180}" torchrun --nproc_per_node 2 \
      benchmarks/bench_tma_ops.py --out "$OUT" ${TMA_ARGS:-}; fi ;;
  rows)     # bench only, from the shipped / cached measured table (CASES selects the rows)
    bench ;;
  all)
    if [[ -n ${SIM_TESTS:-} ]]; then   # one-GPU simulated-rank tests of new kernels; a kernel that fails
      TDCOMPILE_SPIN_TIMEOUT_S=5 step "${SIM_T:-150}" python3 -m pytest -q -rs -p no:cacheprovider -m gpu $SIM_TESTS \
        || { export TDCOMPILE_SKIP_CANDIDATES=${SIM_SKIP:-fused:lamport}; echo "== skipping $TDCOMPILE_SKIP_CANDIDATES" | tee -a "$LOG"; }
    fi                                  # them is left out of the measured table (SIM_SKIP)
    TDCOMPILE_SPIN_TIMEOUT_S=5 step "${TEST_T:-200}" python3 -m pytest -q -rs -p no:cacheprovider -m multigpu \
      ${MG_TESTS:-tests/gpu/test_all_reduce_kernels.py tests/gpu/test_multigpu.py}
    [[ -n ${SKIP_ARB:-} ]] || step 150 torchrun --nproc_per_node "$NP" benchmarks/bench_all_reduce.py --out "$OUT"
    calibrate
    [[ -n ${SKIP_INSPECT:-} ]] || inspect
    bench ;;
esac
# the device tool returns at most 8 files: keep the bench JSONs and this log loose, the rest in one tarball
( cd "$OUT" && rm -f profile-tp*.json && ls | grep -vE '^(bench-.*-tp[0-9]+-[0-9]{8}-[0-9]{6}\.json|gemm-.*\.json|tma-ops-.*\.json|session-.*\.log|host-profile-.*|results-.*\.tgz)$' \
    | tar czf "results-$STAGE.tgz" -T - --remove-files 2>/dev/null ) || true

