"""GEMM -> all-reduce -> residual add -> RMSNorm => ``tdist.gemm_all_reduce_rmsnorm``.

An ``all_reduce_rmsnorm`` match (see ``all_reduce_rmsnorm.py``) whose reduced value comes
straight from a row-parallel linear (o_proj, down_proj) can take that GEMM in as well.  Then the
op owns the GEMM's output buffer, and the fused variants let cuBLAS write it into the symmetric
buffer that the all-reduce + norm kernel reads in place.  The separate op has to copy its input
in first: at 4096x5120 bf16 on 2xH200 that copy cost 145 -> 183 us per call with a 64-CTA
grid (benchmarks/results/all_reduce-h200-w2-2026-11-27-full.json, ``rms_one_shot_g64`` vs
``rms_one_shot_zc_g64``).  Only a compiler can do this: the GEMM and the collective are two
library calls anywhere else.

Before (post-grad, after ``normalize``)::

    mm   = aten.mm(a, b)                                  # or addmm(bias, a, b); single user
    y    = aten.reshape(mm, [B, S, N])                     # zero or more single-user reshapes
    ar   = _c10d_functional.all_reduce(y, "sum", group)
    red  = _c10d_functional.wait_tensor(ar)
    s    = aten.add.Tensor(residual, red)                  # the new residual stream
    ...  HF RMSNorm of s ...                               # (all_reduce_rmsnorm.py's pattern)
    out  = aten.mul.Tensor(weight, hc)

After::

    op     = tdist.gemm_all_reduce_rmsnorm(a, b, bias, residual, weight, eps, group, impl)
    normed = op[0]          # replaces out      (residual's shape)
    new_s  = op[1]          # replaces s

The same all-reduce is also an ``all_reduce_rmsnorm`` match and a ``gemm_all_reduce`` match;
the backend gives it to one of them (``claims.one_claim_per_all_reduce``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch.fx as fx

from tdcompile.passes.all_reduce_rmsnorm import AllReduceRMSNormMatch
from tdcompile.passes.graph_utils import Gemm, NoMatch, concrete, emit, log, producer_gemm, tdist


@dataclass
class GemmAllReduceRMSNormMatch(AllReduceRMSNormMatch):
    """An ``AllReduceRMSNormMatch`` plus the GEMM feeding its all-reduce (through ``chain``)."""
    gemm: Gemm
    chain: list              # reshapes between the GEMM and the all-reduce (GEMM side first)
    pattern: str = field(init=False, default="gemm_all_reduce_rmsnorm")

    def mnk(self):
        m, n, k = self.gemm.mnk
        return concrete(m), n, k

    def describe(self) -> str:
        return f"{self.source} GEMM in the op, eps={self.eps:g}"

    def _emit_op(self, graph: fx.Graph, residual: fx.Node, impl: str) -> fx.Node:
        g = self.gemm          # a, b, bias read now: an earlier rewrite may have replaced their producers
        return emit(graph, tdist.gemm_all_reduce_rmsnorm.default,
                    (g.a, g.b, g.bias, residual, self.weight, self.eps, self.group_name, impl), like=self.out)

    def _producer(self) -> list:
        return [*self.chain, self.gemm.node]


def find_gemm_all_reduce_rmsnorm_matches(rms_matches: list) -> list:
    """The ``all_reduce_rmsnorm`` matches (``find_all_reduce_rmsnorm_matches``) whose all-reduce
    input is a single-user GEMM output (through single-user reshapes), with that GEMM."""
    out = []
    for m in rms_matches:
        try:
            gemm, chain = producer_gemm(m.ar.args[0])
        except NoMatch as e:
            log.debug("all_reduce %s: no gemm_all_reduce_rmsnorm fusion: %s", m.ar.name, e)
            continue
        base = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.init}
        out.append(GemmAllReduceRMSNormMatch(**base, gemm=gemm, chain=chain))
    return out
