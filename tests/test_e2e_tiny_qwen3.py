"""Two ranks on gloo: the unmodified HF Qwen3 (tiny, random init) under HF's plan,
``parallelize_module`` and a sequence-parallel plan, compiled with tdist.

A spawned job (tests/e2e_worker.py) compiles each scenario once (~15-20 s each on 2 cores)
and the tests read its measurements. Reference: the same model in a single process, eager,
fp32. Three scenarios (one per fusion family) run in the default suite; the rest are ``slow``.
"""
import json
import os
import subprocess
import sys
import time

import pytest

TOL_FP32 = 1e-4
WORKER = os.path.join(os.path.dirname(__file__), "e2e_worker.py")
QUICK = ["hf_fused", "torch_sp_fused", "hf_sp_3x7"]
SLOW = ["hf_auto", "hf_auto_h200_profile", "torch_fused", "torch_sp_auto", "torch_sp_rewrite", "hf_fused_bf16",
        "hf_fused_m_odd", "decode_hf_fused", "decode_hf_sp", "no_collectives", "dynamic_m"]
HF_ROW_PARALLEL = sorted(f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj"))
# the norm that follows each of those all_reduces (after the residual add)
HF_NORMS_AFTER_ALL_REDUCE = ["model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm",
                             "model.layers.1.post_attention_layernorm", "model.norm"]
ALL_REDUCE_FAMILIES = ("gemm_all_reduce", "all_reduce_rmsnorm", "gemm_all_reduce_rmsnorm", "all_reduce")


def _run_worker(request, tmp_path_factory, names):
    """Run the 2-rank job for ``names``; progress goes to the terminal (it takes a while)."""
    say = request.config.pluginmanager.get_plugin("terminalreporter").write_line
    out = tmp_path_factory.mktemp("e2e") / "results.json"
    say(f"[e2e] tiny Qwen3 on 2 gloo ranks: {len(names)} scenarios ({', '.join(names)}) ...")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, WORKER, str(out), *names], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    say(f"[e2e] done in {time.monotonic() - t0:.0f} s")
    res = json.loads(out.read_text())
    assert sorted(res) == sorted(names), f"the job ran {sorted(res)}, not {sorted(names)}"
    return res


@pytest.fixture(scope="module")
def quick(request, tmp_path_factory):
    return _run_worker(request, tmp_path_factory, QUICK)


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    return _run_worker(request, tmp_path_factory, SLOW)


def case(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    return r


def patterns(r, pattern=None, choice=None):
    return [m for m in r["matches"] if (pattern is None or m["pattern"] == pattern)
            and (choice is None or m["choice"] == choice)]


def modules(r, pattern, choice=None):
    return sorted(m["module"] for m in patterns(r, pattern, choice))


def assert_every_all_reduce_fused(r):
    """HF's plan has 4 all_reduces (o_proj, down_proj x 2 layers); each must become one tdist op,
    fused with its GEMM (gemm_all_reduce), with the residual add + RMSNorm after it, or both."""
    fused = [m for m in r["matches"] if m["pattern"] in ALL_REDUCE_FAMILIES and m["rewritten"]]
    assert len(fused) == 4, [(m["pattern"], m["module"]) for m in r["matches"]]
    assert {m["module"] for m in fused} <= set(HF_ROW_PARALLEL + HF_NORMS_AFTER_ALL_REDUCE)
    assert r["ops_after"]["_c10d_functional.all_reduce"] == 0 and r["tdist_ops_after"] == 4
    return fused


# ============================================================================ default suite
def test_hf_plan_fused_turns_every_all_reduce_into_a_tdist_op_and_equals_eager(quick):
    r = case(quick, "hf_fused")
    assert_every_all_reduce_fused(r)
    assert all(m["rewritten"] for m in r["matches"] if m["choice"] == "fused")
    assert r["max_diff_single"] <= TOL_FP32


def test_reports_give_the_full_gemm_shape_of_each_fused_linear(quick):
    r = case(quick, "torch_sp_fused")                   # M = B*S = 32 tokens, hidden 256, 2 ranks
    shapes = {(m["pattern"], m["module"]): tuple(m["shape"]) for m in r["matches"]}
    assert shapes["gemm_reduce_scatter", "model.layers.0.self_attn.o_proj"] == (32, 256, 128)  # K = heads/2*head_dim
    assert shapes["gemm_reduce_scatter", "model.layers.0.mlp.down_proj"] == (32, 256, 256)     # K = intermediate / 2
    assert shapes["all_gather_gemm", "model.layers.0.mlp"] == (32, 512, 256)                   # N = gate + up


def test_torch_sequence_parallel_plan_fuses_gathers_and_scatters(quick):
    r = case(quick, "torch_sp_fused")
    ag = patterns(r, "all_gather_gemm", "fused")
    assert modules(r, "gemm_reduce_scatter", "fused") == HF_ROW_PARALLEL
    # q/k/v share one gather and gate/up share one; lm_head gathers too
    assert sorted(m["detail"].split(" ")[0] for m in ag) == ["1", "2", "2", "3", "3"]
    assert len(r["matches"]) == 9 and all(m["rewritten"] for m in r["matches"])
    assert r["ops_after"]["_c10d_functional.reduce_scatter_tensor"] == 0
    assert r["max_diff_single"] <= TOL_FP32


def test_sequence_parallel_rewrite_of_hf_plan_with_rows_not_divisible_by_world(quick):
    r = case(quick, "hf_sp_3x7")                        # 21 tokens over 2 ranks: padded to 22
    assert r["ops_after"]["_c10d_functional.all_reduce"] == 0
    assert modules(r, "gemm_reduce_scatter") == HF_ROW_PARALLEL
    assert not patterns(r, "gemm_all_reduce")
    # gathers only before matmuls: layers 0 MLP, layer 1 attention + MLP, lm_head
    assert len(patterns(r, "all_gather_gemm")) == 4
    assert r["max_diff_single"] <= TOL_FP32


# ============================================================================ slow tier
@pytest.mark.slow
def test_auto_on_cpu_without_profile_keeps_collectives_and_says_why(results):
    r = case(results, "hf_auto")
    assert modules(r, "gemm_all_reduce", "unfused") == HF_ROW_PARALLEL
    assert all(m["choice"] == "unfused" and not m["rewritten"] and "profile" in m["reason"] for m in r["matches"])
    assert r["ops_after"]["_c10d_functional.all_reduce"] == 4 and r["tdist_ops_after"] == 0
    assert r["max_diff_single"] <= TOL_FP32


@pytest.mark.slow
def test_auto_with_a_gpu_profile_fuses_only_where_predicted_cheaper_and_stays_correct(results):
    r = case(results, "hf_auto_h200_profile")
    ar = [m for m in r["matches"] if m["pattern"] in ALL_REDUCE_FAMILIES]
    assert len({m["module"] for m in ar}) >= 4                                     # every all_reduce site decided
    for m in r["matches"]:
        assert "unfused" in m["predicted_us"] and len(m["predicted_us"]) >= 2
        pred = m["predicted_us"]                   # a fused choice only where predicted cheaper than unfused
        assert m["choice"] in pred and (m["choice"] == "unfused" or pred[m["choice"]] < pred["unfused"])
        assert m["rewritten"] == (m["choice"] != "unfused")
    assert r["tdist_ops_after"] == sum(m["rewritten"] for m in r["matches"])
    assert r["max_diff_single"] <= TOL_FP32


@pytest.mark.slow
def test_parallelize_module_plan_fused_equals_eager(results):
    r = case(results, "torch_fused")
    assert_every_all_reduce_fused(r)
    assert r["max_diff_single"] <= TOL_FP32


@pytest.mark.slow
def test_sequence_parallel_plan_under_auto_without_profile_is_plain_inductor(results):
    r = case(results, "torch_sp_auto")
    assert len(patterns(r, "gemm_reduce_scatter", "unfused")) == 4                 # found, and kept unfused
    assert len(patterns(r, "all_gather_gemm", "unfused")) == 5
    assert r["tdist_ops_after"] == 0 and r["max_diff_single"] <= TOL_FP32


@pytest.mark.slow
def test_sequence_parallel_rewrite_of_parallelize_module_plan(results):
    r = case(results, "torch_sp_rewrite")
    assert modules(r, "gemm_reduce_scatter") == HF_ROW_PARALLEL and not patterns(r, "gemm_all_reduce")
    assert r["ops_after"]["_c10d_functional.all_reduce"] == 0
    assert r["max_diff_single"] <= TOL_FP32


@pytest.mark.slow
def test_bf16_fused_is_as_close_to_reference_as_eager_tp(results):
    r = case(results, "hf_fused_bf16")
    assert_every_all_reduce_fused(r)
    assert r["max_diff_single"] <= 3e-2 * r["ref_scale"]
    assert r["max_diff_eager_tp"] <= 3e-2 * r["ref_scale"]


@pytest.mark.slow
def test_m_not_divisible_by_world_size_is_correct(results):
    r = case(results, "hf_fused_m_odd")                 # 1 x 7 tokens
    assert [m["shape"][0] for m in assert_every_all_reduce_fused(r)] == [7] * 4
    assert r["max_diff_single"] <= TOL_FP32


@pytest.mark.slow
def test_static_cache_decode_compiles_fullgraph_once_and_matches(results):
    r = case(results, "decode_hf_fused")
    assert r["graphs"] == 1                              # no recompilation across decode steps
    assert_every_all_reduce_fused(r)
    assert len(r["step_diffs"]) == 3 and max(r["step_diffs"]) <= TOL_FP32


@pytest.mark.slow
def test_sequence_parallel_decode_step_with_padding(results):
    r = case(results, "decode_hf_sp")                   # 3 sequences decode 1 token: 3 rows over 2 ranks
    assert r["graphs"] == 1 and modules(r, "gemm_reduce_scatter") == HF_ROW_PARALLEL
    assert len(r["step_diffs"]) == 3 and max(r["step_diffs"]) <= TOL_FP32


@pytest.mark.slow
def test_model_without_collectives_compiles_like_inductor(results):
    r = case(results, "no_collectives")
    assert r["graphs"] == 1 and r["matches"] == []       # the pass ran, and found nothing
    assert r["max_diff_inductor"] <= 1e-6 and r["max_diff_eager"] <= TOL_FP32


@pytest.mark.slow
def test_dynamic_m_compiles_one_graph_and_decides_inside_the_ops(results):
    r = case(results, "dynamic_m")
    assert r["graphs"] == 1
    gar = patterns(r, "gemm_all_reduce")
    assert sorted(m["module"] for m in gar) == HF_ROW_PARALLEL and all(m["shape"][0] is None for m in gar)
    # M unknown at compile time: decided inside the op at run time ("auto"), or, without a GPU, kept unfused
    assert all(m["choice"] == "auto" or (m["choice"] == "unfused" and "dynamic" in m["reason"]) for m in gar)
    assert len(r["diffs"]) == 3 and max(r["diffs"]) <= TOL_FP32
