"""On a GPU, ``auto`` decides every static-shape match while compiling, all ranks together
(``backend.decide_measured``): a shape the measured table lacks is measured right there, and the
graph either runs the candidate that won or Inductor's own code -- never an ``"auto"`` op whose
run-time fallback is slower than Inductor (2xH200, 2026-11-27: the E2E prefill row ran such
fallbacks of all_reduce_rmsnorm at 0.82x Inductor, ``benchmarks/results/bench-h200-tp2-20261127-100651``).

Run on 2 gloo ranks with the whole backend, decisions taken as on a GPU and the timing harness
replaced by a stub that runs a real collective (``compile_measure_worker.py``)."""
import pytest

import gloo_ranks

WORKER = "tests/compile_measure_worker.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    procs = {s: gloo_ranks.start(WORKER, 2, str(tmp_path_factory.mktemp(s)), s) for s in ("fused_wins", "tie", "dynamic", "host")}
    try:
        return {s: gloo_ranks.collect(p) for s, p in procs.items()}
    finally:                               # one scenario failed: the others' ranks do not outlive it
        for p in procs.values():
            gloo_ranks.kill(p)


def test_a_shape_missing_from_the_table_is_measured_while_compiling_by_every_rank(runs):
    for r in runs["fused_wins"]:
        keys = sorted(c["key"].split("|")[0] for c in r["calls"])
        assert keys == ["all_reduce_rmsnorm", "gemm_all_reduce", "gemm_all_reduce_rmsnorm"]   # each once, in the pass
        assert all(c["real"] and c["ranks"] == 2.0 for c in r["calls"])  # real tensors; both ranks joined


def test_the_measured_winner_is_compiled_in_and_agreed_by_every_rank(runs):
    r0, r1 = runs["fused_wins"]
    # equal gains: the all-reduce goes to the match that covers the most (the GEMM + RMSNorm one)
    assert r0["choices"] == r1["choices"] == ["all_reduce_rmsnorm=unfused", "gemm_all_reduce=unfused",
                                              "gemm_all_reduce_rmsnorm=fused:one_shot"]
    assert r0["times"]["gemm_all_reduce_rmsnorm"]["unfused"] == 11.0       # the max over ranks
    assert r0["rewritten"] and r0["err"] < 1e-5 and r1["err"] < 1e-5


def test_a_tie_keeps_inductors_code_and_no_auto_op_is_left(runs):
    for r in runs["tie"]:
        assert r["choices"] == ["all_reduce_rmsnorm=unfused", "gemm_all_reduce=unfused", "gemm_all_reduce_rmsnorm=unfused"]
        assert not r["rewritten"] and r["err"] < 1e-5


def test_a_second_compile_reuses_the_agreement_and_caches_are_bypassed(runs):
    for r in runs["fused_wins"]:
        assert r["choices2"] == r["choices"] and len(r["calls"]) == 3      # nothing measured again
        assert r["uuid"] is None               # no rank may be served from Inductor's cache, skipping the pass


def test_dynamic_m_leaves_to_run_time_only_ops_whose_fallback_is_inductors_own_code(runs):
    """With M unknown the op picks per M bucket at run time; its ``unfused`` fallback there is
    NCCL on the GEMM's output (what Inductor runs) for gemm_all_reduce, but for all_reduce_rmsnorm
    and gemm_all_reduce_rmsnorm it would lose Inductor's fused add + RMSNorm kernel: those are not
    rewritten."""
    for r in runs["dynamic"]:
        assert r["calls"] == []                                            # nothing to measure at compile
        assert r["choices"] == ["all_reduce_rmsnorm=unfused", "gemm_all_reduce=auto", "gemm_all_reduce_rmsnorm=unfused"]
        assert "dynamic M" in r["reasons"]["all_reduce_rmsnorm"] and r["err"] < 1e-5
        assert "dynamic M" in r["reasons"]["gemm_all_reduce_rmsnorm"]


def test_un_graphed_a_candidate_slower_to_issue_than_inductors_code_runs_stays_unfused(runs):
    """The GEMM + all-reduce + RMSNorm candidate takes 5 us on the device but 50 us to issue;
    Inductor's code takes 11 us. Un-graphed, Inductor's code stays; for a graph compiled inside
    ``cuda_graphed()`` (the Engine's decode capture) or with ``cuda_graphs=True``, it is fused."""
    fused = ["all_reduce_rmsnorm=unfused", "gemm_all_reduce=unfused", "gemm_all_reduce_rmsnorm=fused:one_shot"]
    for r in runs["host"]:
        assert r["choices"] == ["all_reduce_rmsnorm=unfused", "gemm_all_reduce=unfused", "gemm_all_reduce_rmsnorm=unfused"]
        assert r["times"]["gemm_all_reduce_rmsnorm"]["fused:one_shot"] == 50.0
        assert "host" in r["reasons"]["gemm_all_reduce_rmsnorm"] and not r["rewritten"]
        assert r["graphed"] == {"block": fused, "option": fused}


def test_agreement_collectives_do_not_deadlock_under_the_python_dispatcher_inductor_compiles_with(tmp_path):
    """CI, 2026-11-27: both ranks of a scenario above hung in ``max_over_ranks`` while compiling
    (gloo's worker thread waited for the GIL to free the previous call's tensors; the next call
    held the GIL, waiting for the worker's queue).  ``measured``'s collectives run with the Python
    dispatcher off: 6000 of them back to back finish in seconds."""
    for r in gloo_ranks.collect(gloo_ranks.start(WORKER, 2, str(tmp_path), "storm"), timeout=300):
        assert r["calls"] == 6000 and r["s"] < 120
