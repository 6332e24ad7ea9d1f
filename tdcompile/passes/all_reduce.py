"""All-reduce family: ``matmul -> all_reduce`` => ``tdist.gemm_all_reduce`` and a lone
``all_reduce`` => ``tdist.all_reduce``.

Row-parallel linears (o_proj, down_proj) under HF's plan or ``RowwiseParallel`` produce::

    mm = aten.mm(a, b)                      # or addmm(bias, a, b)
    y  = aten.reshape(mm, [B, S, N])        # zero or more single-user reshapes
    ar = _c10d_functional.all_reduce(y, "sum", group)
    out = _c10d_functional.wait_tensor(ar)

(HF's in-place ``dist.all_reduce`` leaves an ``aten.copy(y, out)`` that ``normalize``
folds.) After::

    r   = tdist.gemm_all_reduce(a, b, bias, group, impl)     # [M, N]
    out = aten.reshape(r, [B, S, N])
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch.fx as fx

from tdcompile.passes.graph_utils import (NoMatch, c10d, check_dtype, concrete, emit, erase_dead, aten, log,
                                          module_path, producer_gemm, shape, tdist, wait_of)
from tdcompile.passes.match import Match, SingleGemmMatch


@dataclass
class GemmAllReduceMatch(SingleGemmMatch):
    ar: fx.Node
    wait: fx.Node
    pattern: str = field(init=False, default="gemm_all_reduce")

    def replace_with(self, graph: fx.Graph, impl: str) -> None:
        g = self.gemm
        with graph.inserting_before(self.wait):
            fused = emit(graph, tdist.gemm_all_reduce.default, (g.a, g.b, g.bias, self.group_name, impl), like=g.node)
            out = fused
            if self.chain:   # reuse the graph's own target shape: it may hold symbolic sizes
                out = emit(graph, aten.reshape.default, (fused, self.chain[-1].args[1]), like=g.node)
        self.wait.replace_all_uses_with(out)
        erase_dead([self.wait, self.ar, *self.chain, g.node])


@dataclass
class AllReduceMatch(Match):
    ar: fx.Node
    wait: fx.Node
    pattern: str = field(init=False, default="all_reduce")

    rows_cols: tuple = field(init=False)   # the input as a [rows, cols] matrix, fixed at match time

    def __post_init__(self):
        s = shape(self.inp)
        rows = 1
        for d in s[:-1]:
            rows = rows * d
        self.rows_cols = (concrete(rows), s[-1] if s else 1)

    @property
    def inp(self) -> fx.Node:
        """Read at use: an earlier rewrite may have replaced the node that produced it."""
        return self.ar.args[0]

    def mnk(self):
        return (*self.rows_cols, 0)

    def replace_with(self, graph: fx.Graph, impl: str) -> None:
        with graph.inserting_before(self.wait):
            out = emit(graph, tdist.all_reduce.default, (self.inp, self.group_name, impl), like=self.inp)
        self.wait.replace_all_uses_with(out)
        erase_dead([self.wait, self.ar])


def find_all_reduce_matches(graph: fx.Graph) -> list[Match]:
    """Every ``all_reduce(sum)`` becomes a gemm_all_reduce match when a GEMM produces it,
    otherwise a lone all_reduce match."""
    matches: list[Match] = []
    for ar in graph.find_nodes(op="call_function", target=c10d.all_reduce.default):
        x, op, group = ar.args[:3]
        try:
            if op != "sum":
                raise NoMatch(f"reduce op {op!r}")
            wait = wait_of(ar)
            dtype = check_dtype(x)
            world = _world_size(group)
        except NoMatch as e:
            log.debug("all_reduce %s stays unfused: %s", ar.name, e)
            continue
        try:
            gemm, chain = producer_gemm(x)
            matches.append(GemmAllReduceMatch(module=module_path(gemm.node), group_name=group, world_size=world,
                                              dtype=dtype, gemm=gemm, chain=chain, ar=ar, wait=wait))
        except NoMatch as e:
            log.debug("all_reduce %s: no GEMM fusion (%s); matching it alone", ar.name, e)
            matches.append(AllReduceMatch(module=module_path(x), group_name=group, world_size=world, dtype=dtype,
                                          ar=ar, wait=wait))
    return matches


def _world_size(group_name: str) -> int:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return dist.get_world_size(_resolve_process_group(group_name))
    except Exception as e:  # group not resolvable in this process
        raise NoMatch(f"cannot resolve process group {group_name!r}: {e}")
