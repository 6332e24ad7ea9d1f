"""The tdist pass on toy graphs with an all_gather before or a reduce_scatter after a matmul
(fake 2-rank group; harness: ``toy_passes``).

* all_gather -> matmul(s) becomes one ``tdist.all_gather_gemm`` taking every consumer's weight
  (a gather on dim 1 moves its split/cat permutation onto the outputs; a non-matmul user gets the
  gathered tensor back from the op; an ``addmm`` bias is added after the op);
* matmul -> reduce_scatter becomes ``tdist.gemm_reduce_scatter`` (a scatter on dim 1 permutes the
  GEMM input; the bias stays inside the reduction);
* a gather on the last dim, without a matmul consumer or in an integer dtype, a scatter of rows not
  divisible by the world size and a ``max`` reduce stay unfused, logging why.
"""
from __future__ import annotations

import pytest
import torch

from toy_passes import (B, K, N, S, W, _group, addmm_reduce_scatter_dim1, all_gather, aten, c10d, collectives,
                        gather_addmm, gather_dim0_mm, gather_dim1_gate_up, gather_dim1_qkv, gather_transposed_weight,
                        gather_with_other_user, mm_reduce_scatter_dim0, output_node, r, rewrite, tdist_ops)


# ============================================================================ all_gather_gemm
def test_gather_on_dim0_into_a_matmul_becomes_all_gather_gemm(fake_pg):
    before, after, report, gm = rewrite(gather_dim0_mm, r(4, K), r(K, N), strategy="fused")
    assert collectives(before) == {"c10d.all_gather_into_tensor": 1, "c10d.wait_tensor": 1}
    assert tdist_ops(after) == {"tdist.all_gather_gemm": 1} and not collectives(after) and after["aten.mm"] == 0
    (op,) = gm.graph.find_nodes(op="call_function", target=torch.ops.tdist.all_gather_gemm.default)
    _, bs, world, group, return_a, impl = op.args
    assert (len(bs), world, group, return_a, impl) == (1, W, fake_pg, False, "fused")
    (d,) = report.matches
    assert (d.pattern, d.shape) == ("all_gather_gemm", (W * 4, N, K))   # M is the gathered row count


@pytest.mark.parametrize("fn,widths", [(gather_dim1_qkv, (8, 4, 4)), (gather_dim1_gate_up, (12, 12))],
                         ids=["qkv", "gate_up"])
def test_consumers_of_one_gather_become_one_all_gather_gemm_with_all_their_weights(fake_pg, fn, widths):
    ws = [r(K, n) for n in widths]
    before, after, report, gm = rewrite(fn, r(B, S // W, K), *ws, strategy="fused")
    assert before["aten.mm"] == len(widths)
    assert tdist_ops(after) == {"tdist.all_gather_gemm": 1} and after["aten.mm"] == 0 and not collectives(after)
    (op,) = gm.graph.find_nodes(op="call_function", target=torch.ops.tdist.all_gather_gemm.default)
    assert [tuple(b.meta["val"].shape) for b in op.args[1]] == [(K, n) for n in widths]
    (d,) = report.matches
    assert d.shape == (B * S, sum(widths), K)                          # N summed over the weights
    assert d.match.describe().startswith(f"{len(widths)} weights")


def test_gather_on_dim1_moves_its_split_cat_permutation_onto_the_outputs(fake_pg):
    before, after, _, gm = rewrite(gather_dim1_qkv, r(B, S // W, K), r(K, 8), r(K, 4), r(K, 4), strategy="fused")
    assert before["aten.split"] == 1 and before["aten.cat"] == 1
    assert after["aten.split"] == 3 and after["aten.cat"] == 3          # one row permutation per output
    (op,) = gm.graph.find_nodes(op="call_function", target=torch.ops.tdist.all_gather_gemm.default)
    assert tuple(op.args[0].meta["val"].shape) == (B * S // W, K)       # the shard goes in as [m, K]
    for split in gm.graph.find_nodes(op="call_function", target=aten.split.Tensor):
        assert split.meta["val"][0].shape[-1] in (8, 4)                 # permuting N-wide outputs, not A
    outs = [tuple(a.meta["val"].shape) for a in output_node(gm).args[0]]
    assert outs == [(B, S, 8), (B * S, 4), (B * S, 4)]


def test_gather_with_a_non_matmul_user_returns_the_gathered_tensor_from_the_op(fake_pg):
    _, after, report, gm = rewrite(gather_with_other_user, r(4, K), r(K, N), r(K, N), strategy="fused")
    assert tdist_ops(after) == {"tdist.all_gather_gemm": 1} and not collectives(after)
    (op,) = gm.graph.find_nodes(op="call_function", target=torch.ops.tdist.all_gather_gemm.default)
    assert op.args[4] is True                                           # return_a
    (d,) = report.matches
    assert d.match.return_a and "returns A" in d.match.describe()
    (add,) = gm.graph.find_nodes(op="call_function", target=aten.add.Tensor)
    assert tuple(add.args[0].meta["val"].shape) == (W * 4, K)


def test_gather_into_addmm_adds_the_bias_after_the_op(fake_pg):
    _, after, report, gm = rewrite(gather_addmm, r(4, K), r(K, N), r(N), strategy="fused")
    assert tdist_ops(after) == {"tdist.all_gather_gemm": 1} and after["aten.addmm"] == 0
    assert after["aten.add"] == 1
    assert report.matches[0].shape == (W * 4, N, K)


def test_gather_into_linear_whose_weight_is_transposed_after_the_wait_is_fused(fake_pg):
    _, after, _, _ = rewrite(gather_transposed_weight, r(4, K), r(N, K), strategy="fused")
    assert tdist_ops(after) == {"tdist.all_gather_gemm": 1}


def test_gather_on_the_last_dim_stays_unfused_and_logs_why(fake_pg, pass_log):
    fn = lambda x, w: torch.mm(all_gather(x, dim=1), w)  # noqa: E731  x [4, 8] -> [4, 16]
    _, after, report, _ = rewrite(fn, r(4, K // W), r(K, N), strategy="fused")
    assert not tdist_ops(after) and after["c10d.all_gather_into_tensor"] == 1 and after["aten.mm"] == 1
    assert not report.matches
    assert "gather on the last (K) dim" in pass_log.text


def test_gather_without_a_matmul_consumer_stays_unfused_and_logs_why(fake_pg, pass_log):
    _, after, report, _ = rewrite(lambda x: all_gather(x) * 2.0, r(4, K), strategy="fused")
    assert not tdist_ops(after) and after["c10d.all_gather_into_tensor"] == 1 and not report.matches
    assert "no matmul consumer" in pass_log.text


def test_integer_gather_stays_unfused_and_logs_the_dtype(fake_pg, pass_log):
    _, after, report, _ = rewrite(lambda x: all_gather(x) + 1, torch.ones(4, K, dtype=torch.int32),
                                  strategy="fused")
    assert not tdist_ops(after) and not report.matches
    assert "dtype torch.int32 not supported" in pass_log.text


# ============================================================================ gemm_reduce_scatter
def test_mm_then_reduce_scatter_becomes_gemm_reduce_scatter(fake_pg):
    before, after, report, gm = rewrite(mm_reduce_scatter_dim0, r(8, K), r(K, N), strategy="fused")
    assert collectives(before) == {"c10d.reduce_scatter_tensor": 1, "c10d.wait_tensor": 1}
    assert tdist_ops(after) == {"tdist.gemm_reduce_scatter": 1} and not collectives(after) and after["aten.mm"] == 0
    (op,) = gm.graph.find_nodes(op="call_function", target=torch.ops.tdist.gemm_reduce_scatter.default)
    assert op.meta["val"].shape == (8 // W, N)
    (d,) = report.matches
    assert (d.pattern, d.shape) == ("gemm_reduce_scatter", (8, N, K))   # M is the pre-scatter row count


def test_scatter_on_dim1_with_bias_permutes_the_gemm_input_and_keeps_the_bias(fake_pg):
    before, after, report, gm = rewrite(addmm_reduce_scatter_dim1, r(B * S, K), r(K, N), r(N), strategy="fused")
    assert before["aten.split"] == 1 and before["aten.cat"] == 1 and before["aten.addmm"] == 1
    assert tdist_ops(after) == {"tdist.gemm_reduce_scatter": 1} and after["aten.addmm"] == 0
    (op,) = gm.graph.find_nodes(op="call_function", target=torch.ops.tdist.gemm_reduce_scatter.default)
    assert op.args[2] is not None and op.args[2].op == "placeholder"  # bias inside the reduction
    (split,) = gm.graph.find_nodes(op="call_function", target=aten.split.Tensor)
    assert split.meta["val"][0].shape == (B, S // W, K)                 # permutation on the K-wide input
    (out,) = output_node(gm).all_input_nodes
    assert tuple(out.meta["val"].shape) == (B, S // W, N)
    assert report.matches[0].shape == (B * S, N, K)


def test_reduce_scatter_of_rows_not_divisible_by_world_size_stays_unfused(fake_pg, pass_log):
    fn = lambda a, w: c10d.wait_tensor(c10d.reduce_scatter_tensor(torch.mm(a, w), "sum", W, _group()))  # noqa
    _, after, report, _ = rewrite(fn, r(3, K), r(K, N), strategy="fused")
    assert not tdist_ops(after) and after["c10d.reduce_scatter_tensor"] == 1 and not report.matches
    assert "scattered dim 3 not known to divide by 2" in pass_log.text


def test_reduce_scatter_max_stays_unfused(fake_pg, pass_log):
    fn = lambda a, w: c10d.wait_tensor(c10d.reduce_scatter_tensor(torch.mm(a, w), "max", W, _group()))  # noqa
    _, after, report, _ = rewrite(fn, r(8, K), r(K, N), strategy="fused")
    assert not tdist_ops(after) and not report.matches
    assert "reduce op 'max'" in pass_log.text
