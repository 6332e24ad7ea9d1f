"""The tdist pass on toy graphs ending in an all_reduce (fake 2-rank group; harness: ``toy_passes``).

* ``mm``/``addmm`` -> all_reduce becomes one ``tdist.gemm_all_reduce`` (reshapes folded, bias kept
  inside the reduction, HF's in-place all_reduce copy folded by ``normalize``);
* an all_reduce without a matmul producer becomes ``tdist.all_reduce``;
* a GEMM with a second user, a ``max`` reduce or an integer dtype stays unfused, logging why.
"""
from __future__ import annotations

import pytest
import torch

from tdcompile.passes.normalize import normalize

from toy_passes import (B, K, N, S, addmm_all_reduce, all_reduce, aten, c10d, collectives, hf_inplace_all_reduce,
                        lone_all_reduce, mm_all_reduce_2d, mm_all_reduce_3d, op_counts, output_node, r, rewrite,
                        tdist_ops, trace)


# ============================================================================ gemm_all_reduce
def test_mm_then_all_reduce_becomes_one_gemm_all_reduce(fake_pg):
    before, after, report, _ = rewrite(mm_all_reduce_2d, r(8, K), r(K, N), strategy="fused")
    assert before["aten.mm"] == 1 and collectives(before) == {"c10d.all_reduce": 1, "c10d.wait_tensor": 1}
    assert tdist_ops(after) == {"tdist.gemm_all_reduce": 1}
    assert not collectives(after) and after["aten.mm"] == 0
    (d,) = report.matches
    assert (d.pattern, d.shape, d.choice, d.rewritten) == ("gemm_all_reduce", (8, N, K), "fused", True)


def test_reshapes_around_the_mm_are_folded_into_the_gemm_all_reduce(fake_pg):
    before, after, report, gm = rewrite(mm_all_reduce_3d, r(B, S, K), r(K, N), strategy="fused")
    assert tdist_ops(after) == {"tdist.gemm_all_reduce": 1} and not collectives(after)
    (op,) = gm.graph.find_nodes(op="call_function", target=torch.ops.tdist.gemm_all_reduce.default)
    assert op.meta["val"].shape == (B * S, N)                        # the op works on the 2-D GEMM
    (out,) = output_node(gm).all_input_nodes
    assert out.target == aten.reshape.default and out.args[0] is op  # one reshape back to [B, S, N]
    assert tuple(out.meta["val"].shape) == (B, S, N)
    assert report.matches[0].shape == (B * S, N, K)


def test_gemm_all_reduce_with_bias_keeps_bias_inside_the_reduction(fake_pg):
    before, after, report, gm = rewrite(addmm_all_reduce, r(B, S, K), r(N, K), r(N), strategy="fused")
    assert before["aten.addmm"] == 1
    assert tdist_ops(after) == {"tdist.gemm_all_reduce": 1} and after["aten.addmm"] == 0
    (op,) = gm.graph.find_nodes(op="call_function", target=torch.ops.tdist.gemm_all_reduce.default)
    bias = op.args[2]
    assert bias is not None and bias.op == "placeholder" and bias.name.startswith("bias")
    assert after["aten.add"] == 0   # reduce(a @ b + bias), not reduce(a @ b) + bias
    assert report.matches[0].shape == (B * S, N, K)


def test_normalize_folds_hf_inplace_copy_and_turns_views_into_reshapes(fake_pg):
    gm = trace(hf_inplace_all_reduce, r(B, S, K), r(N, K))
    assert op_counts(gm)["aten.copy"] == 1 and op_counts(gm)["aten.view"] >= 1
    changed = normalize(gm.graph)
    counts = op_counts(gm)
    assert counts["aten.copy"] == 0 and counts["aten.view"] == 0 and counts["aten._unsafe_view"] == 0
    assert changed >= 2
    (wait,) = gm.graph.find_nodes(op="call_function", target=c10d.wait_tensor.default)
    assert [u.target for u in wait.users] == [aten.add.Tensor]       # users read the wait directly


def test_hf_inplace_all_reduce_is_fused_after_the_copy_is_folded(fake_pg):
    before, after, report, _ = rewrite(hf_inplace_all_reduce, r(B, S, K), r(N, K), strategy="fused")
    assert before["aten.copy"] == 1
    assert after["aten.copy"] == 0 and tdist_ops(after) == {"tdist.gemm_all_reduce": 1}
    assert not collectives(after) and after["aten.mm"] == 0
    assert [d.pattern for d in report.matches] == ["gemm_all_reduce"]


def test_lone_all_reduce_becomes_tdist_all_reduce(fake_pg, pass_log):
    before, after, report, _ = rewrite(lone_all_reduce, r(B, S, N), strategy="fused")
    assert tdist_ops(after) == {"tdist.all_reduce": 1} and not collectives(after)
    (d,) = report.matches
    assert (d.pattern, d.shape, d.choice) == ("all_reduce", (B * S, N, 0), "fused")
    assert "not a matmul" in pass_log.text


def mm_with_second_user_behind_reshape(x, w):
    y = torch.mm(x.reshape(-1, K), w)
    return all_reduce(y.reshape(B, S, N)), y * 2.0


def mm_with_second_user_no_reshape(x, w):
    y = torch.mm(x, w)
    return all_reduce(y), y * 2.0


def reshape_with_second_user(x, w):
    y = torch.mm(x.reshape(-1, K), w).reshape(B, S, N)
    return all_reduce(y), y * 2.0


def _assert_no_gemm_fusion(after, report):
    assert after["aten.mm"] == 1 and "tdist.gemm_all_reduce" not in after
    assert "gemm_all_reduce" not in [d.pattern for d in report.matches]


def test_mm_with_a_second_user_stays_unfused_and_logs_why(fake_pg, pass_log):
    _, after, report, _ = rewrite(mm_with_second_user_behind_reshape, r(B, S, K), r(K, N), strategy="fused")
    _assert_no_gemm_fusion(after, report)
    assert "mm has 2 users" in pass_log.text


@pytest.mark.parametrize("fn", [mm_with_second_user_no_reshape, reshape_with_second_user],
                         ids=["mm_directly", "reshape_between"])
def test_mm_whose_output_has_a_second_user_is_not_fused_even_without_reshape(fake_pg, pass_log, fn):
    x = r(8, K) if fn is mm_with_second_user_no_reshape else r(B, S, K)
    _, after, report, _ = rewrite(fn, x, r(K, N), strategy="fused")
    _assert_no_gemm_fusion(after, report)


def test_all_reduce_max_stays_unfused_and_logs_the_reduce_op(fake_pg, pass_log):
    _, after, report, _ = rewrite(lambda x, w: all_reduce(torch.mm(x, w), "max"), r(8, K), r(K, N),
                                  strategy="fused")
    assert not tdist_ops(after) and after["c10d.all_reduce"] == 1 and not report.matches
    assert "reduce op 'max'" in pass_log.text


def test_integer_all_reduce_stays_unfused_and_logs_the_dtype(fake_pg, pass_log):
    _, after, report, _ = rewrite(lambda x: all_reduce(x * 2), torch.ones(4, N, dtype=torch.int64),
                                  strategy="fused")
    assert not tdist_ops(after) and after["c10d.all_reduce"] == 1 and not report.matches
    assert "dtype torch.int64 not supported" in pass_log.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_floating_dtypes_are_fused_and_reported(fake_pg, dtype):
    _, after, report, _ = rewrite(mm_all_reduce_2d, r(8, K, dtype=dtype), r(K, N, dtype=dtype), strategy="fused")
    assert tdist_ops(after) == {"tdist.gemm_all_reduce": 1}
    assert report.matches[0].match.dtype == dtype
    assert report.rows()[0]["dtype"] == str(dtype).split(".")[-1]
