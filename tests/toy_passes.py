"""Harness of the tdist-pass toy tests (``tests/test_passes_*.py``), in one process, on a fake
2-rank process group -- and the worker that checks their numerics on 2 real gloo ranks.

A toy function written with ``torch.ops._c10d_functional`` collectives is traced to an ATen graph
with ``make_fx(tracing_mode="fake")`` (the form of Inductor's post-grad graph: functional
collectives, ``mm``/``addmm``, ``view``), then the real ``TdistPass`` runs on that graph exactly as
Inductor would call it (``rewrite``). Tests count ops before/after (``op_counts``) and read the
match fields from the report.

Numerics of the rewrites (split/cat permutations, bias, row padding of the sequence-parallel
rewrite): ``numerics_cases`` run the original and the rewritten graph modules on 2 real gloo ranks,
this module being the worker (``python tests/toy_passes.py RANK RDZV``).
"""
from __future__ import annotations

import copy
import json
import logging
import sys
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import tdcompile  # noqa: F401  (registers torch.ops.tdist.*)
from tdcompile import backend
from tdcompile.backend import TdistPass
from tdcompile.config import Options
from tdcompile.report import Report

c10d = torch.ops._c10d_functional
aten = torch.ops.aten
W = 2  # world size of every toy graph



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


def _rep_and_shard(seed: int, rank: int):
    """``(rep, shard)`` makers: ``rep`` gives the same values on every rank (replicated tensors),
    ``shard`` this rank's own (TP shards, scaled by 1/sqrt(first dim))."""
    g = torch.Generator().manual_seed(seed)
    gr = torch.Generator().manual_seed(seed + 1000 * (rank + 1))
    return (lambda *sh: torch.randn(*sh, generator=g),
            lambda *sh: torch.randn(*sh, generator=gr) / sh[0] ** 0.5)


def tp_layer_inputs(b, s, seed=0, rank=0):
    """Replicated inputs (residual, norm weight) equal on every rank; TP shards differ."""
    rep, shard = _rep_and_shard(seed, rank)
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
    rep, shard = _rep_and_shard(seed, rank)
    one = lambda: [shard(H, KO), shard(KO, H), rep(H), rep(H), shard(H, I), shard(H, I), shard(I, H)]  # noqa: E731
    return (rep(b, s, H), *one(), *one())


# ============================================================================ regression graphs (issue 12)
def gather_linear_linear_scatter(x, w1, w2):
    """all_gather -> Linear -> Linear -> reduce_scatter, nothing between the linears: the second
    GEMM's input is the first GEMM, which the all_gather_gemm rewrite replaces."""
    return reduce_scatter(torch.mm(torch.mm(all_gather(x), w1), w2))          # [W*4, K] -> [4, K]


def all_reduce_pointwise_linear_all_reduce(x, w):
    """Under sequence parallel the linear becomes mm(all_gather(..)) -> reduce_scatter: one GEMM
    that both an all_gather_gemm and a gemm_reduce_scatter could claim."""
    return all_reduce(torch.mm(torch.relu(all_reduce(x)), w))


def linear_regrouped_all_reduce(x, w, w2):
    """The reshape between the GEMM and the all_reduce regroups rows: [6, 4] -> [3, 8]."""
    h = all_reduce(torch.mm(x, w).reshape(3, 8)) + 1.0                       # 3 tokens: padded to 4
    return torch.mm(h, w2)                                                   # [3, 4]


def k1_linear_after_all_reduce(x, w):
    """A Linear with K=1 after an all_reduce: Inductor turns it into mul([T, 1], [1, N]), whose
    [1, N] weight differs per rank (column parallel)."""
    return all_reduce(torch.mm(all_reduce(x), w))                            # x [T, 1], w [1, N]


# ============================================================================ numerics on 2 gloo ranks
def numerics_cases(rank):
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


NUMERICS_CASES = list(numerics_cases(0))


def _numerics_worker(rank: int, rdzv: str) -> dict:
    import gloo_ranks
    gloo_ranks.init(rank, W, rdzv)
    out = {}
    try:
        for name, (fn, args, options) in numerics_cases(rank).items():
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
        gloo_ranks.finish()
    return out


if __name__ == "__main__":   # numerics worker: python tests/toy_passes.py RANK RDZV
    logging.basicConfig(level=logging.WARNING)
    print("RESULT " + json.dumps(_numerics_worker(int(sys.argv[1]), sys.argv[2])), flush=True)
