"""The sequence-parallel rewrite of toy tensor-parallel layers (fake 2-rank group; harness: ``toy_passes``).

``strategy="sequence_parallel"`` turns every all_reduce into reduce_scatter + all_gather and fuses
both into the neighbouring GEMMs: norms run on 1/W of the rows, the replicated residual is sliced
locally, rows are padded when tokens do not divide by the world size, and gathers remain only in
front of the graph outputs. Then the regressions of issue 12: GEMMs claimed by two fusions, rows
regrouped by reshapes, broadcasts that widen the rows.
"""
from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch

from tdcompile.config import Options
from tdcompile.passes import sequence_parallel
from tdcompile.passes.normalize import normalize

from toy_passes import (B, H, I, K, KO, N, S, W, all_reduce, all_reduce_pointwise_linear_all_reduce, aten, c10d,
                        collectives, gather_linear_linear_scatter, linear_regrouped_all_reduce, make_tp_layer,
                        make_two_tp_layers, mm_all_reduce_3d, output_node, r, reduce_scatter, rewrite, tdist_ops,
                        tp_layer_inputs, trace, two_tp_layers_inputs)


# ============================================================================ sequence parallel
def _sp(b, s, **options):
    options.setdefault("strategy", "sequence_parallel")
    return rewrite(make_tp_layer(b, s), *tp_layer_inputs(b, s), **options)


def _gathers_feed_only_outputs(gm) -> bool:
    """Every plain all_gather left (not fused into a GEMM) feeds only graph outputs
    (through slices/reshapes that undo padding and restore the shape)."""
    passthrough = {aten.slice.Tensor, aten.reshape.default, c10d.wait_tensor.default}
    for ag in gm.graph.find_nodes(op="call_function", target=c10d.all_gather_into_tensor.default):
        todo = list(ag.users)
        while todo:
            u = todo.pop()
            if u.op == "output":
                continue
            if u.op != "call_function" or u.target not in passthrough:
                return False
            todo += list(u.users)
    return True


def test_sequence_parallel_converts_every_all_reduce(fake_pg):
    before, after, report, _ = _sp(B, S)
    assert before["c10d.all_reduce"] == 2
    assert after["c10d.all_reduce"] == 0 and after["c10d.reduce_scatter_tensor"] == 0
    assert after["tdist.gemm_reduce_scatter"] == 2                 # o_proj and down_proj
    assert after["tdist.all_gather_gemm"] == 1                     # gate and up share one gather
    assert after["aten.mm"] == 0
    agg = report.by_pattern("all_gather_gemm")
    assert len(agg) == 1 and agg[0].shape == (B * S, 2 * I, H)
    assert [d.shape for d in report.by_pattern("gemm_reduce_scatter")] == [(B * S, H, KO), (B * S, H, I)]


def test_sequence_parallel_gathers_only_before_matmuls_and_outputs(fake_pg):
    _, after, _, gm = _sp(B, S)
    assert after["c10d.all_gather_into_tensor"] == 1               # the layer output, once
    assert _gathers_feed_only_outputs(gm)
    for target in (aten.pow.Tensor_Scalar, aten.mean.dim, aten.rsqrt.default):  # the norm runs on 1/W of the rows
        (n,) = gm.graph.find_nodes(op="call_function", target=target)
        assert n.meta["val"].shape[0] == B * S // W


def test_sequence_parallel_slices_the_replicated_residual_locally(fake_pg):
    _, _, _, gm = _sp(B, S)
    resid = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("resid"))
    (view,) = resid.users
    (sl,) = view.users
    assert sl.target == aten.slice.Tensor and tuple(sl.args[1:]) == (0, 0, B * S // W)   # rank 0's rows
    assert tuple(sl.meta["val"].shape) == (B * S // W, H)


def test_sequence_parallel_pads_rows_when_tokens_do_not_divide_by_world_size(fake_pg):
    b, s = 1, 3                                                    # 3 tokens, 2 ranks -> pad to 4
    before, after, _, gm = _sp(b, s)
    assert after["c10d.all_reduce"] == 0 and after["tdist.gemm_reduce_scatter"] == 2
    assert after["tdist.all_gather_gemm"] == 1
    assert after["aten.constant_pad_nd"] >= 2                      # both GEMM inputs padded to 4 rows
    for op in gm.graph.find_nodes(op="call_function", target=torch.ops.tdist.gemm_reduce_scatter.default):
        assert op.args[0].meta["val"].shape[0] == 4 and op.meta["val"].shape[0] == 2
    out = output_node(gm).all_input_nodes[0]
    assert tuple(out.meta["val"].shape) == (b, s, H)               # padding sliced off before the output
    assert _gathers_feed_only_outputs(gm)


def test_sequence_parallel_keeps_the_residual_sharded_across_layers(fake_pg):
    b, s = B, S
    before, after, report, gm = rewrite(make_two_tp_layers(b, s), *two_tp_layers_inputs(b, s),
                                        strategy="sequence_parallel")
    assert before["c10d.all_reduce"] == 4
    assert after["c10d.all_reduce"] == 0 and after["tdist.gemm_reduce_scatter"] == 4
    # layer 0 gate/up, layer 1 q, layer 1 gate/up; layer 0's q reads the replicated input: plain mm
    assert after["tdist.all_gather_gemm"] == 3 and after["aten.mm"] == 1
    assert after["c10d.all_gather_into_tensor"] == 1 and _gathers_feed_only_outputs(gm)


def test_sequence_parallel_skipped_below_min_sp_rows_keeps_gemm_all_reduce(fake_pg, pass_log):
    _, after, _, _ = _sp(B, S, min_sp_rows=B * S + 1)
    assert sum(tdist_ops(after).values()) == 2 and "tdist.gemm_reduce_scatter" not in after
    assert after["c10d.all_reduce"] == 0 and after["c10d.reduce_scatter_tensor"] == 0
    assert "min_sp_rows" in pass_log.text


def test_sequence_parallel_is_not_applied_by_auto_without_a_profile(fake_pg):
    _, after, _, _ = _sp(B, S, strategy="auto")
    assert after["c10d.all_reduce"] == 2 and not after["c10d.reduce_scatter_tensor"]


def test_the_sequence_parallel_option_forces_the_form_and_leaves_each_match_to_the_strategy(fake_pg):
    """``sequence_parallel="always"``: the form is rewritten, and each match is then decided by
    ``strategy`` (auto with no GPU and no profile: unfused collectives); ``"never"`` keeps
    all_reduce even under ``strategy="sequence_parallel"``'s kernels."""
    _, after, report, _ = _sp(B, S, strategy="auto", sequence_parallel="always")
    assert after["c10d.all_reduce"] == 0 and after["c10d.reduce_scatter_tensor"] == 2
    assert not tdist_ops(after)                                        # no match fused: auto kept them
    assert any("sequence_parallel='always'" in d.reason for _, d in report.graph_decisions)
    _, after, _, _ = _sp(B, S, strategy="fused", sequence_parallel="always")
    assert after["tdist.gemm_reduce_scatter"] == 2 and after["tdist.all_gather_gemm"] == 1
    _, after, _, _ = _sp(B, S, strategy="fused", sequence_parallel="never")
    assert after["c10d.reduce_scatter_tensor"] == 0 and "tdist.gemm_reduce_scatter" not in after
    assert sum(tdist_ops(after).values()) == 2 and after["c10d.all_reduce"] == 0   # both all_reduces fused as such


def test_sequence_parallel_prediction_counts_the_same_gemms_on_both_sides(fake_pg):
    import dataclasses

    from tdcompile import cost_model

    # toy-sized GEMMs on a very slow device (so they cost whole microseconds), communication free
    free_comm = dataclasses.replace(cost_model.DeviceProfile.load("h200"), gemm_tflops=1e-6, hbm_gbps=1e-3,
                                    launch_us=0.0, p2p_latency_us=0.0, nccl_latency_us=0.0, link_gbps=1e12,
                                    nccl_gbps=1e12, overlap=1.0, fused_gemm_efficiency=1.0)
    gm = trace(make_tp_layer(B, S), *tp_layer_inputs(B, S))
    normalize(gm.graph)
    pred = sequence_parallel.decide(gm.graph, Options(strategy="auto"), free_comm).predicted_us
    assert pred["sequence_parallel"] == pytest.approx(pred["all_reduce"], rel=0.01)


def test_auto_does_not_trade_a_gemm_all_reduce_for_a_reduce_scatter_plus_an_uncosted_gather(fake_pg):
    _, after, report, _ = rewrite(mm_all_reduce_3d, r(B, S, K), r(K, N), strategy="auto", profile="h200")
    assert "c10d.all_gather_into_tensor" not in after
    assert [d.pattern for d in report.matches] == ["gemm_all_reduce"]


# ============================================================================ regressions (issue 12)
# (graphs: toy_passes.gather_linear_linear_scatter, all_reduce_pointwise_linear_all_reduce,
#  linear_regrouped_all_reduce, k1_linear_after_all_reduce)
@pytest.mark.parametrize("options", [{"strategy": "fused"}, {"strategy": "sequence_parallel"},
                                     {"strategy": "auto", "profile": "h100"}], ids=["fused", "sp", "auto_h100"])
def test_gather_linear_linear_scatter_fuses_both_ends_into_a_valid_graph(fake_pg, options):
    _, after, report, gm = rewrite(gather_linear_linear_scatter, r(4, K), r(K, N), r(N, K), **options)
    gm.graph.lint()                                                   # topologically ordered
    rewritten = sorted(d.pattern for d in report.matches if d.rewritten)
    assert sorted(d.pattern for d in report.matches) == ["all_gather_gemm", "gemm_reduce_scatter"]
    assert tdist_ops(after) == Counter({f"tdist.{p}": 1 for p in rewritten})


def test_fused_gather_linear_linear_scatter_reads_the_first_gemm_from_the_fused_op(fake_pg):
    _, after, _, gm = rewrite(gather_linear_linear_scatter, r(4, K), r(K, N), r(N, K), strategy="fused")
    assert tdist_ops(after) == {"tdist.all_gather_gemm": 1, "tdist.gemm_reduce_scatter": 1}
    assert not collectives(after) and after["aten.mm"] == 0
    (ag,) = gm.graph.find_nodes(op="call_function", target=torch.ops.tdist.all_gather_gemm.default)
    (rs,) = gm.graph.find_nodes(op="call_function", target=torch.ops.tdist.gemm_reduce_scatter.default)
    a = rs.args[0]                                                    # getitem(getitem(ag, 1), 0)
    assert a.target is operator.getitem and a.args[0].args[0] is ag


def test_sequence_parallel_gives_a_gemm_to_one_fusion_only(fake_pg):
    _, after, report, gm = rewrite(all_reduce_pointwise_linear_all_reduce, r(B * S, K), r(K, K),
                                   strategy="sequence_parallel")
    gm.graph.lint()
    assert after["c10d.all_reduce"] == 0 and after["aten.mm"] == 0
    # the GEMM goes to gemm_reduce_scatter; its input gather stays a plain all_gather
    assert [d.pattern for d in report.matches] == ["gemm_reduce_scatter"]
    assert tdist_ops(after) == {"tdist.gemm_reduce_scatter": 1}
    (rs,) = gm.graph.find_nodes(op="call_function", target=torch.ops.tdist.gemm_reduce_scatter.default)
    assert rs.args[0].target is c10d.wait_tensor.default and rs.args[0].args[0].target is \
        c10d.all_gather_into_tensor.default


def test_sequence_parallel_pads_the_all_reduce_input_when_reshapes_regroup_the_gemm_rows(fake_pg):
    _, after, _, gm = rewrite(linear_regrouped_all_reduce, r(6, K), r(K, 4), r(8, 4), strategy="sequence_parallel")
    (rs,) = gm.graph.find_nodes(op="call_function", target=c10d.reduce_scatter_tensor.default)
    assert tuple(rs.args[0].meta["val"].shape) == (4, 8)                     # [3, 8] padded, not the GEMM's [7, 4]
    (out,) = output_node(gm).all_input_nodes
    assert tuple(out.meta["val"].shape) == (3, 4)
    assert tdist_ops(after) == {"tdist.all_gather_gemm": 1}


def test_sequence_parallel_gathers_before_a_broadcast_that_widens_the_rows(fake_pg):
    _, after, _, gm = rewrite(lambda x, w: all_reduce(all_reduce(x) * w), r(B * S, 1), r(1, N),
                              strategy="sequence_parallel")
    (mul,) = gm.graph.find_nodes(op="call_function", target=aten.mul.Tensor)
    assert tuple(mul.meta["val"].shape) == (B * S, N)                        # on the gathered rows, not a shard


def test_gemm_reduce_scatter_needs_whole_gemm_rows_per_rank(fake_pg, pass_log):
    fn = lambda a, w: reduce_scatter(torch.mm(a, w).reshape(6, 3))  # noqa: E731  [3, 6] -> [6, 3]: 1.5 rows each
    _, after, report, _ = rewrite(fn, r(3, K), r(K, 6), strategy="fused")
    assert not tdist_ops(after) and not report.matches
    assert "GEMM rows 3 not known to divide by 2" in pass_log.text
