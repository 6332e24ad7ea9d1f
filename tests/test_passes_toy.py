"""The tdist pipeline on toy graphs, in one process, on a fake 2-rank process group.

Harness: a toy function written with ``torch.ops._c10d_functional`` collectives is traced to an
ATen graph with ``make_fx(tracing_mode="fake")`` (the form of Inductor's post-grad graph:
functional collectives, ``mm``/``addmm``, ``view``), then the real ``TdistPass`` runs on that
graph exactly as Inductor would call it. Tests count ops before/after and read the match
fields from the report. A few tests go through ``torch.compile(backend="tdist")`` /
``tdcompile.explain`` (module paths, options plumbing, Inductor lowering).

Numerics of the rewrites (split/cat permutations, bias, row padding of the sequence-parallel
rewrite) are checked by running the original and the rewritten graph modules on 2 real gloo
ranks: this file doubles as that worker (``python tests/test_passes_toy.py RANK PORT``).
"""
from __future__ import annotations

import copy
import json
import logging
import operator
import os
import socket
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import tdcompile
from tdcompile import backend
from tdcompile.backend import TdistPass
from tdcompile.config import Options
from tdcompile.passes import sequence_parallel
from tdcompile.passes.normalize import normalize
from tdcompile.report import Report

c10d = torch.ops._c10d_functional
aten = torch.ops.aten
W = 2  # world size of every toy graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ============================================================================ harness
def _group() -> str:
    return dist.group.WORLD.group_name


def all_reduce(x, op="sum"):
    return c10d.wait_tensor(c10d.all_reduce(x, op, _group()))


def all_gather(x, dim=0):
    """funcol's lowering of a gather on ``dim``: gather on 0, then split(B) -> cat(dim)."""
    g = c10d.wait_tensor(c10d.all_gather_into_tensor(x, W, _group()))
    if dim != 0:
        g = torch.cat(torch.split(g, x.shape[0], 0), dim)
    return g


def reduce_scatter(y, dim=0):
    """funcol's lowering of a scatter on ``dim``: cat(split(y, S/W, dim), 0), then scatter on 0."""
    if dim != 0:
        y = torch.cat(torch.split(y, y.shape[dim] // W, dim), 0)
    return c10d.wait_tensor(c10d.reduce_scatter_tensor(y, "sum", W, _group()))


def trace(fn, *args) -> torch.fx.GraphModule:
    return make_fx(fn, tracing_mode="fake")(*args)


def op_counts(gm) -> Counter:
    """``{"aten.mm": 2, "aten.add": 1, "c10d.all_reduce": 1, "tdist.gemm_all_reduce": 1, "getitem": 3}``
    (overload names dropped)."""
    out = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_function":
            target = n.target
            name = str(target.overloadpacket) if isinstance(target, torch._ops.OpOverload) else target.__name__
            out[name.replace("_c10d_functional.", "c10d.")] += 1
    return out


def run_pass(gm, **options) -> Report:
    """Run the real TdistPass on ``gm.graph`` (as Inductor's post-grad hook does); return its report."""
    report = Report()
    backend._sinks.append(report)
    try:
        TdistPass(Options(**options))(gm.graph)
    finally:
        backend._sinks.remove(report)
    gm.recompile()
    return report


def rewrite(fn, *args, **options):
    """Trace ``fn``, run the pass; returns (ops before, ops after, report, rewritten module)."""
    gm = trace(fn, *args)
    before = op_counts(gm)
    report = run_pass(gm, **options)
    return before, op_counts(gm), report, gm


def output_node(gm) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output")


def tdist_ops(counts: Counter) -> Counter:
    return Counter({k: v for k, v in counts.items() if k.startswith("tdist.")})


def collectives(counts: Counter) -> Counter:
    return Counter({k: v for k, v in counts.items() if k.startswith("c10d.")})


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# ============================================================================ toy graphs
B, S, K, N = 2, 4, 16, 8      # activations [B, S, K], weights [K, N]


def mm_all_reduce_2d(x, w):                       # x [M, K]
    return all_reduce(torch.mm(x, w))


def mm_all_reduce_3d(x, w):                       # x [B, S, K]: reshape before and after the mm
    return all_reduce(torch.mm(x.reshape(-1, K), w).reshape(B, S, N))


def addmm_all_reduce(x, w, bias):                 # nn.Linear with bias: addmm
    return all_reduce(F.linear(x, w, bias))


def hf_inplace_all_reduce(x, w):
    """HF's row-parallel linear: ``dist.all_reduce(out)`` in place; functionalization leaves
    ``copy(out, wait)`` and the users read the copy."""
    y = F.linear(x, w)
    out = all_reduce(y)
    return aten.copy(y, out) + 1.0


def lone_all_reduce(x):
    return all_reduce(x * 2.0)


def gather_dim0_mm(x, w):                         # x [m, K] -> [W*m, K] -> one matmul
    return torch.mm(all_gather(x), w)


def gather_dim1_qkv(x, wq, wk, wv):
    """torch SP's column-parallel q/k/v: gather [B, S/W, K] on dim 1, then three matmuls."""
    g = all_gather(x, dim=1)                      # [B, S, K]
    return (torch.mm(g.reshape(-1, K), wq).reshape(B, S, -1), torch.mm(g.reshape(-1, K), wk),
            torch.mm(g.reshape(-1, K), wv))


def gather_dim1_gate_up(x, wg, wu):
    g = all_gather(x, dim=1).reshape(-1, K)
    return F.silu(torch.mm(g, wg)) * torch.mm(g, wu)


def gather_with_other_user(x, wg, wu):             # the gathered activation is also needed as is
    g = all_gather(x)
    return torch.mm(g, wg), torch.mm(g, wu), g + 1.0


def gather_addmm(x, w, bias):
    return torch.addmm(bias, all_gather(x), w)


def gather_transposed_weight(x, w):               # nn.Linear-style: the weight's t() comes after the wait
    return all_gather(x) @ w.t()


def mm_reduce_scatter_dim0(a, w):                 # a [M, K] -> [M/W, N]
    return reduce_scatter(torch.mm(a, w))


def addmm_reduce_scatter_dim1(a, w, bias):
    """torch SP's row-parallel linear with ``output_layouts=Shard(1)``: scatter [B, S, N] on dim 1."""
    y = torch.addmm(bias, a, w).reshape(B, S, -1)
    return reduce_scatter(y, dim=1)               # [B, S/W, N]


H, I, KO = 16, 12, 8    # hidden, intermediate (per rank), attention width (per rank)


def rms_norm(h, weight):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def make_tp_layer(b, s):
    """One tensor-parallel decoder layer as HF's plan traces it (attention replaced by its
    row-parallel o_proj): mm -> all_reduce -> add(residual) -> rmsnorm -> gate/up mms -> mul
    -> down mm -> all_reduce -> add."""
    def layer(xa, resid, wo, nw, wg, wu, wd):
        h = resid + all_reduce(torch.mm(xa.reshape(-1, KO), wo).reshape(b, s, H))
        n = rms_norm(h, nw).reshape(-1, H)
        a = F.silu(torch.mm(n, wg)) * torch.mm(n, wu)
        return h + all_reduce(torch.mm(a, wd).reshape(b, s, H))
    return layer


def tp_layer_inputs(b, s, seed=0, rank=0):
    """Replicated inputs (residual, norm weight) equal on every rank; TP shards differ."""
    g = torch.Generator().manual_seed(seed)
    gr = torch.Generator().manual_seed(seed + 1000 * (rank + 1))
    rep = lambda *sh: torch.randn(*sh, generator=g)  # noqa: E731
    shard = lambda *sh: torch.randn(*sh, generator=gr) / sh[0] ** 0.5  # noqa: E731
    return (shard(b, s, KO), rep(b, s, H), shard(KO, H), rep(H), shard(H, I), shard(H, I), shard(I, H))


def make_two_tp_layers(b, s):
    """Two layers with column-parallel q (on the normed residual) and row-parallel o, then MLP."""
    def block(h, wq, wo, nw1, nw2, wg, wu, wd):
        q = torch.mm(rms_norm(h, nw1).reshape(-1, H), wq)
        h = h + all_reduce(torch.mm(F.silu(q), wo).reshape(b, s, H))
        n = rms_norm(h, nw2).reshape(-1, H)
        return h + all_reduce(torch.mm(F.silu(torch.mm(n, wg)) * torch.mm(n, wu), wd).reshape(b, s, H))

    def two_layers(h, *ws):
        return block(block(h, *ws[:7]), *ws[7:])
    return two_layers


def two_tp_layers_inputs(b, s, seed=0, rank=0):
    g = torch.Generator().manual_seed(seed)
    gr = torch.Generator().manual_seed(seed + 1000 * (rank + 1))
    rep = lambda *sh: torch.randn(*sh, generator=g)  # noqa: E731
    shard = lambda *sh: torch.randn(*sh, generator=gr) / sh[0] ** 0.5  # noqa: E731
    one = lambda: [shard(H, KO), shard(KO, H), rep(H), rep(H), shard(H, I), shard(H, I), shard(I, H)]  # noqa: E731
    return (rep(b, s, H), *one(), *one())


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


# ============================================================================ options, decisions, dumps
def test_unknown_option_is_rejected_with_the_list_of_valid_options():
    with pytest.raises(ValueError) as e:
        Options.from_mapping({"strategy": "fused", "fuse_everything": True})
    msg = str(e.value)
    assert "fuse_everything" in msg
    for key in ("strategy", "dump_dir", "profile", "min_sp_rows"):
        assert key in msg


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="strategy.* must be one of"):
        Options.from_mapping({"strategy": "fastest"})


def test_torch_compile_with_an_unknown_option_fails_and_names_it(fake_pg):
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x + 1, backend="tdist", options={"bogus": 1})
    with pytest.raises(Exception, match="valid options"):
        fn(torch.ones(2))
    torch._dynamo.reset()


def test_strategy_unfused_rewrites_nothing(fake_pg):
    before, after, report, _ = rewrite(make_tp_layer(B, S), *tp_layer_inputs(B, S), strategy="unfused")
    assert not tdist_ops(after)
    assert collectives(after) == collectives(before) and after["aten.mm"] == before["aten.mm"]
    assert [d.pattern for d in report.matches].count("gemm_all_reduce") == 2   # o_proj and down_proj
    assert all(d.choice == "unfused" and not d.rewritten for d in report.matches)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default profile is the GPU's")
def test_auto_on_cpu_without_a_profile_keeps_everything_unfused_and_says_why(fake_pg):
    _, after, report, _ = rewrite(make_tp_layer(B, S), *tp_layer_inputs(B, S), strategy="auto")
    assert not tdist_ops(after) and after["c10d.all_reduce"] == 2
    assert [d.pattern for d in report.matches].count("gemm_all_reduce") == 2
    for d in report.matches:
        assert d.choice == "unfused" and "profile" in d.reason and d.predicted_us == {}


def _profile_file(tmp_path, **constants) -> str:
    """A device profile (JSON path) that differs from the shipped h200 one by ``constants``."""
    import dataclasses

    from tdcompile import cost_model

    path = str(tmp_path / "profile.json")
    dataclasses.replace(cost_model.DeviceProfile.load("h200"), **constants).save(path)
    return path


@pytest.mark.parametrize("constants,expected", [
    (dict(p2p_latency_us=1e6, link_gbps=1e-3), "unfused"),                   # our P2P kernels hopelessly slow
    (dict(nccl_latency_us=1e6, nccl_gbps=1e-3, p2p_latency_us=0.0), "fused"),  # NCCL hopelessly slow
], ids=["slow_p2p_keeps_unfused", "slow_nccl_fuses"])
def test_auto_with_a_profile_picks_the_candidate_the_profile_makes_cheaper(fake_pg, tmp_path, constants, expected):
    _, after, report, _ = rewrite(mm_all_reduce_3d, r(B, S, K), r(K, N), strategy="auto",
                                  profile=_profile_file(tmp_path, **constants),
                                  min_sp_rows=10**9)   # keep the sequence-parallel rewrite out of this one
    (d,) = report.matches
    assert d.choice == expected
    assert {"fused", "unfused"} <= set(d.predicted_us)
    assert d.predicted_us[expected] < d.predicted_us["fused" if expected == "unfused" else "unfused"]
    assert (tdist_ops(after) == {"tdist.gemm_all_reduce": 1}) == (expected == "fused")
    assert d.rewritten == (expected == "fused")


def test_dump_dir_writes_each_stage_named_by_pipeline_position(fake_pg, tmp_path):
    gm = trace(make_tp_layer(B, S), *tp_layer_inputs(B, S))
    run_pass(gm, strategy="fused", dump_dir=str(tmp_path))
    (gdir,) = (tmp_path / "rank0").iterdir()
    assert gdir.name.startswith("graph")
    assert sorted(p.name for p in gdir.iterdir()) == [
        "00.input.py", "01.normalize.after.py", "03.match.txt", "04.rewrite.after.py"]
    assert "_c10d_functional.all_reduce" in (gdir / "00.input.py").read_text()
    assert "aten.view" not in (gdir / "01.normalize.after.py").read_text()
    assert (gdir / "03.match.txt").read_text().count("gemm_all_reduce") == 2
    after = (gdir / "04.rewrite.after.py").read_text()
    assert after.count("torch.ops.tdist.") == 2 and "_c10d_functional.all_reduce" not in after


def test_dump_dir_includes_the_sequence_parallel_stage_when_it_runs(fake_pg, tmp_path):
    gm = trace(make_tp_layer(B, S), *tp_layer_inputs(B, S))
    run_pass(gm, strategy="sequence_parallel", dump_dir=str(tmp_path))
    (gdir,) = (tmp_path / "rank0").iterdir()
    names = sorted(p.name for p in gdir.iterdir())
    assert names == ["00.input.py", "01.normalize.after.py", "02.sequence_parallel.after.py", "03.match.txt",
                     "04.rewrite.after.py"]
    assert "reduce_scatter_tensor" in (gdir / "02.sequence_parallel.after.py").read_text()


def test_pass_uuid_is_stable_and_changes_with_the_options():
    def uuid(**kw):
        return TdistPass(Options(**kw)).uuid()

    assert uuid() == uuid()
    assert uuid(strategy="fused") == uuid(strategy="fused")
    variants = [uuid(), uuid(strategy="fused"), uuid(strategy="unfused"), uuid(strategy="sequence_parallel"),
                uuid(dump_dir="/tmp/x"), uuid(profile="h200"), uuid(profile="h100"), uuid(min_sp_rows=64)]
    assert len(set(variants)) == len(variants)


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
def gather_linear_linear_scatter(x, w1, w2):
    """all_gather -> Linear -> Linear -> reduce_scatter, nothing between the linears: the second
    GEMM's input is the first GEMM, which the all_gather_gemm rewrite replaces."""
    return reduce_scatter(torch.mm(torch.mm(all_gather(x), w1), w2))          # [W*4, K] -> [4, K]


def all_reduce_pointwise_linear_all_reduce(x, w):
    """Under sequence parallel the linear becomes mm(all_gather(..)) -> reduce_scatter: one GEMM
    that both an all_gather_gemm and a gemm_reduce_scatter could claim."""
    return all_reduce(torch.mm(torch.relu(all_reduce(x)), w))


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


def linear_regrouped_all_reduce(x, w, w2):
    """The reshape between the GEMM and the all_reduce regroups rows: [6, 4] -> [3, 8]."""
    h = all_reduce(torch.mm(x, w).reshape(3, 8)) + 1.0                       # 3 tokens: padded to 4
    return torch.mm(h, w2)                                                   # [3, 4]


def test_sequence_parallel_pads_the_all_reduce_input_when_reshapes_regroup_the_gemm_rows(fake_pg):
    _, after, _, gm = rewrite(linear_regrouped_all_reduce, r(6, K), r(K, 4), r(8, 4), strategy="sequence_parallel")
    (rs,) = gm.graph.find_nodes(op="call_function", target=c10d.reduce_scatter_tensor.default)
    assert tuple(rs.args[0].meta["val"].shape) == (4, 8)                     # [3, 8] padded, not the GEMM's [7, 4]
    (out,) = output_node(gm).all_input_nodes
    assert tuple(out.meta["val"].shape) == (3, 4)
    assert tdist_ops(after) == {"tdist.all_gather_gemm": 1}


def k1_linear_after_all_reduce(x, w):
    """A Linear with K=1 after an all_reduce: Inductor turns it into mul([T, 1], [1, N]), whose
    [1, N] weight differs per rank (column parallel)."""
    return all_reduce(torch.mm(all_reduce(x), w))                            # x [T, 1], w [1, N]


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


# ============================================================================ through torch.compile
class RowParallelAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.o_proj = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return all_reduce(self.o_proj(x))


class SequenceParallelMLP(nn.Module):
    """Gather [B, S/W, 8] on dim 1 -> gate/up -> down (with bias) -> scatter on dim 1."""
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(8, 12, bias=False)
        self.up_proj = nn.Linear(8, 12, bias=False)
        self.down_proj = nn.Linear(12, 8, bias=True)

    def forward(self, x):
        g = all_gather(x, dim=1)
        return reduce_scatter(self.down_proj(F.silu(self.gate_proj(g)) * self.up_proj(g)), dim=1)


class Sync(nn.Module):
    def forward(self, x):
        return all_reduce(x * 2.0)


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = RowParallelAttention()
        self.mlp = SequenceParallelMLP()
        self.sync = Sync()

    def forward(self, x):                    # x [2, 4, 16]
        h = self.attn(x)                     # [2, 4, 8]
        return self.sync(self.mlp(h[:, :2]))  # this rank's half of the sequence -> [2, 2, 8]


@pytest.fixture(scope="module")
def explained(fake_pg, tmp_path_factory):
    """One real compile (Dynamo -> AOT -> Inductor post-grad -> TdistPass -> Inductor) of ToyBlock."""
    dump = tmp_path_factory.mktemp("dump")
    torch.manual_seed(0)
    report = tdcompile.explain(ToyBlock(), torch.randn(2, 4, 16), options={"strategy": "fused", "dump_dir": str(dump)})
    torch._dynamo.reset()
    return report, dump


def test_explain_reports_every_pattern_with_its_module_path_and_shape(explained):
    report, _ = explained
    got = {(d.pattern, d.module, d.shape, d.choice) for d in report.matches}
    assert got == {
        ("gemm_all_reduce", "attn.o_proj", (8, 8, 16), "fused"),
        ("all_gather_gemm", "mlp", (8, 24, 8), "fused"),           # gate + up: N = 12 + 12
        ("gemm_reduce_scatter", "mlp.down_proj", (8, 8, 12), "fused"),
        ("all_reduce", "sync", (4, 8, 0), "fused"),
    }
    agg = report.by_pattern("all_gather_gemm")[0]
    assert agg.match.describe() == "2 weights (gate_proj, up_proj)"
    assert all(d.rewritten and d.reason.startswith("strategy='fused'") for d in report.matches)


def test_explain_shows_the_graph_before_and_after_and_a_table(explained):
    report, _ = explained
    assert len(report.graphs) == 1
    before, after = report.graphs[0]
    assert "_c10d_functional.all_reduce" in before and "tdist." not in before
    for op in ("gemm_all_reduce", "all_gather_gemm", "gemm_reduce_scatter", "all_reduce"):
        assert f"torch.ops.tdist.{op}.default" in after
    assert "_c10d_functional" not in after
    text = str(report)
    assert "attn.o_proj" in text and "mlp.down_proj" in text and "4 matches, 4 rewritten" in text
    assert [row["module"] for row in json.loads(report.to_json())] == [d.module for d in report.matches]


def test_backend_dump_dir_option_reaches_the_pass(explained):
    _, dump = explained
    files = {p.name for p in dump.glob("rank0/graph*/*")}
    assert {"00.input.py", "01.normalize.after.py", "03.match.txt", "04.rewrite.after.py"} <= files


class RowParallelPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.o_proj = nn.Linear(16, 8, bias=True)
        self.down_proj = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        h = all_reduce(self.o_proj(x))
        return all_reduce(self.down_proj(F.gelu(h))) + h


def test_compiled_gemm_all_reduce_matches_eager_through_inductor(fake_pg):
    # On the fake group all_reduce leaves data untouched in eager, in the reference op and in
    # Inductor's lowering alike, so this checks GEMM + bias + reshapes + Inductor's handling of the op.
    torch.manual_seed(0)
    m, x = RowParallelPair(), torch.randn(2, 3, 16)
    with torch.no_grad():
        eager = m(x)
    report = tdcompile.explain(m, x, options={"strategy": "fused"})
    torch._dynamo.reset()
    assert [d.pattern for d in report.matches] == ["gemm_all_reduce", "gemm_all_reduce"]
    assert all(d.rewritten for d in report.matches)
    torch.testing.assert_close(report.output, eager, rtol=1e-5, atol=1e-5)


# ============================================================================ numerics on 2 gloo ranks
def _numerics_cases(rank):
    """name -> (function, inputs, options). Inputs differ per rank except replicated ones."""
    g = torch.Generator().manual_seed(100 + rank)
    t = lambda *sh: torch.randn(*sh, generator=g)  # noqa: E731
    rep = lambda *sh: torch.randn(*sh, generator=torch.Generator().manual_seed(7))  # noqa: E731  same on every rank
    fused = {"strategy": "fused"}
    sp = {"strategy": "sequence_parallel"}
    return {
        "gemm_all_reduce_3d": (mm_all_reduce_3d, (t(B, S, K), t(K, N)), fused),
        "gemm_all_reduce_bias": (addmm_all_reduce, (t(B, S, K), t(N, K), t(N)), fused),
        "gemm_all_reduce_hf_copy": (hf_inplace_all_reduce, (t(B, S, K), t(N, K)), fused),
        "all_reduce": (lone_all_reduce, (t(B, S, N),), fused),
        "all_gather_gemm_dim0": (gather_dim0_mm, (t(4, K), t(K, N)), fused),
        "all_gather_gemm_dim1_qkv": (gather_dim1_qkv, (t(B, S // W, K), t(K, 8), t(K, 4), t(K, 4)), fused),
        "all_gather_gemm_return_a": (gather_with_other_user, (t(4, K), t(K, N), t(K, N)), fused),
        "all_gather_gemm_bias": (gather_addmm, (t(4, K), t(K, N), t(N)), fused),
        "gemm_reduce_scatter_dim0": (mm_reduce_scatter_dim0, (t(8, K), t(K, N)), fused),
        "gemm_reduce_scatter_dim1_bias": (addmm_reduce_scatter_dim1, (t(B * S, K), t(K, N), t(N)), fused),
        "sequence_parallel_layer": (make_tp_layer(B, S), tp_layer_inputs(B, S, rank=rank), sp),
        "sequence_parallel_layer_padded": (make_tp_layer(1, 3), tp_layer_inputs(1, 3, rank=rank), sp),
        "sequence_parallel_two_layers": (make_two_tp_layers(B, S), two_tp_layers_inputs(B, S, rank=rank), sp),
        "sequence_parallel_two_layers_padded": (make_two_tp_layers(3, 5), two_tp_layers_inputs(3, 5, rank=rank),
                                                sp),
        "gather_linear_linear_scatter": (gather_linear_linear_scatter, (t(4, K), t(K, N), t(N, K)), fused),
        "gather_linear_linear_scatter_sp": (gather_linear_linear_scatter, (t(4, K), t(K, N), t(N, K)), sp),
        "all_reduce_pointwise_linear_all_reduce_sp": (all_reduce_pointwise_linear_all_reduce,
                                                      (rep(B * S, K), t(K, K)), sp),
        "linear_regrouped_all_reduce_sp": (linear_regrouped_all_reduce, (t(6, K), t(K, 4), t(8, 4)), sp),
        "k1_linear_after_all_reduce_sp": (k1_linear_after_all_reduce, (t(B * S, 1), t(1, N)), sp),
    }


NUMERICS_CASES = list(_numerics_cases(0))


def _numerics_worker(rank: int, port: int) -> dict:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    out = {}
    try:
        for name, (fn, args, options) in _numerics_cases(rank).items():
            try:
                ref = trace(fn, *args)
                new = copy.deepcopy(ref)
                report = run_pass(new, **options)
                want, got = ref(*args), new(*args)
                want = want if isinstance(want, (tuple, list)) else (want,)
                got = got if isinstance(got, (tuple, list)) else (got,)
                assert [w.shape for w in want] == [g.shape for g in got], "output shapes differ"
                out[name] = {"max_abs_diff": max(float((w - g).abs().max()) for w, g in zip(want, got)),
                             "rewritten": sum(d.rewritten for d in report.matches),
                             "tdist_ops": sum(tdist_ops(op_counts(new)).values())}
            except Exception as e:  # report per case; keep the ranks in step
                out[name] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        dist.destroy_process_group()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gloo_numerics():
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(rk), str(port)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rk in range(W)]
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("gloo numerics workers timed out")
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"worker failed (rc={p.returncode}):\n{stderr[-4000:]}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


@pytest.mark.parametrize("case", NUMERICS_CASES)
def test_rewritten_graph_computes_the_same_values_on_two_gloo_ranks(gloo_numerics, case):
    for rank, res in enumerate(gloo_numerics):
        got = res[case]
        assert "error" not in got, f"rank {rank}: {got.get('error')}"
        assert got["rewritten"] >= 1 and got["tdist_ops"] >= 1, f"rank {rank}: nothing was rewritten"
        assert got["max_abs_diff"] <= 1e-4, f"rank {rank}: max abs diff {got['max_abs_diff']}"


if __name__ == "__main__":   # numerics worker: python tests/test_passes_toy.py RANK PORT
    logging.basicConfig(level=logging.WARNING)
    print("RESULT " + json.dumps(_numerics_worker(int(sys.argv[1]), int(sys.argv[2]))), flush=True)
