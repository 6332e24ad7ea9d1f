"""``matmul -> reduce_scatter`` => ``tdist.gemm_reduce_scatter``.

Row-parallel linears whose output is sequence-sharded (``RowwiseParallel(output_layouts=
Shard(1))``, or our sequence-parallel rewrite)::

    mm  = aten.mm(a, b)                                  # [B*S, N] (or addmm with a bias)
    y   = aten.reshape(mm, [B, S, N])
    [sp = aten.split(y, S/W, 1); y = aten.cat([sp[0], ..], 0)]    # scatter on dim 1
    rs  = _c10d_functional.reduce_scatter_tensor(y, "sum", W, group)
    out = _c10d_functional.wait_tensor(rs)               # [B, S/W, N]

After::

    [a  = reshape(a, [B, S, K]) -> split(S/W, 1) -> cat(0) -> reshape([-1, K])]
    r   = tdist.gemm_reduce_scatter(a, b, bias, W, group, impl)      # [B*S/W, N]
    out = aten.reshape(r, [B, S/W, N])

A scatter on a dim other than 0 is a row permutation of the matmul output; it commutes
with the matmul, so it is applied to the (K-wide) input instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from tdcompile.passes.graph_utils import (SPLITS, NoMatch, aten, c10d, check_dtype, concrete, emit,
                                          emit_getitem, erase_dead, is_call, log, module_path, producer_gemm,
                                          reshape_arg, shape, single_user, tdist, wait_of)
from tdcompile.passes.match import Match, SingleGemmMatch


@dataclass
class GemmReduceScatterMatch(SingleGemmMatch):
    perm: Optional[tuple]       # (split, cat, dim, y) when scattered on dim != 0
    rs: fx.Node
    wait: fx.Node
    pattern: str = field(init=False, default="gemm_reduce_scatter")

    def replace_with(self, graph: fx.Graph, impl: str) -> None:
        g, like = self.gemm, self.gemm.node
        k = shape(g.a)[-1]
        with graph.inserting_before(self.wait):
            a = g.a
            if self.perm is not None:
                split, cat, dim, y = self.perm
                a3 = emit(graph, aten.reshape.default, (a, reshape_arg([*shape(y)[:-1], k])), like=like)
                parts = emit(graph, split.target, (a3, *split.args[1:]), like=like)
                items = [emit_getitem(graph, parts, i, like=like) for i in range(len(cat.args[0]))]
                a = emit(graph, aten.cat.default, (items, 0), like=like)
                a = emit(graph, aten.reshape.default, (a, [-1, k]), like=like)
            r = emit(graph, tdist.gemm_reduce_scatter.default,
                     (a, g.b, g.bias, self.world_size, self.group_name, impl), like=like)
            out = emit(graph, aten.reshape.default, (r, reshape_arg(shape(self.wait))), like=like)
        self.wait.replace_all_uses_with(out)
        dead = [self.wait, self.rs]
        if self.perm is not None:
            split, cat, _, _ = self.perm
            dead += [cat, *cat.args[0], split]
        erase_dead(dead + self.chain + [g.node])


def _scatter_permutation(x: fx.Node, world: int):
    """Recognise funcol's lowering of a scatter on dim != 0: cat(split(y, c, dim), 0)."""
    if not is_call(x, aten.cat.default) or (len(x.args) > 1 and x.args[1] != 0):
        return x, None
    items = list(x.args[0])
    splits = {it.args[0] for it in items if is_call(it, __import__("operator").getitem)}
    if len(items) != world or len(splits) != 1:
        raise NoMatch("cat before reduce_scatter is not of one split")
    split = splits.pop()
    if not is_call(split, *SPLITS) or any(single_user(it) is not x for it in items) or len(split.users) != world:
        raise NoMatch("split feeding the reduce_scatter has other users")
    y = split.args[0]
    ndim = len(shape(y))
    dim = (split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)) % ndim
    if dim in (0, ndim - 1):
        raise NoMatch(f"scatter permutation on dim {dim}")
    if len(y.users) != 1:
        raise NoMatch(f"{y.name} has other users")
    reshape_arg(shape(y))  # the input permutation needs y's shape (<= 1 dynamic dim)
    return y, (split, x, dim, y)


def find_gemm_reduce_scatter_matches(graph: fx.Graph) -> list[Match]:
    matches: list[Match] = []
    for rs in graph.find_nodes(op="call_function", target=c10d.reduce_scatter_tensor.default):
        x, op, world, group = rs.args[:4]
        try:
            if op != "sum":
                raise NoMatch(f"reduce op {op!r}")
            wait = wait_of(rs)
            dtype = check_dtype(x)
            y, perm = _scatter_permutation(x, world)
            gemm, chain = producer_gemm(y)
            if perm is None and (concrete(shape(x)[0]) is None or shape(x)[0] % world):
                raise NoMatch(f"scattered dim {shape(x)[0]} not known to divide by {world}")
            m, n, _ = gemm.mnk
            # the op scatters whole GEMM rows: the scattered chunks must be whole rows of [M, N]
            if concrete(m) is None or m % world:
                raise NoMatch(f"GEMM rows {m} not known to divide by {world}")
            if perm is not None and shape(y)[-1] != n:
                raise NoMatch(f"reshapes between the GEMM and the scatter change its last dim ({n} -> {shape(y)[-1]})")
            reshape_arg(shape(wait))  # the output reshape must be expressible (<= 1 dynamic dim)
        except NoMatch as e:
            log.debug("reduce_scatter %s stays unfused: %s", rs.name, e)
            continue
        matches.append(GemmReduceScatterMatch(module=module_path(gemm.node), group_name=group, world_size=world,
                                              dtype=dtype, gemm=gemm, chain=chain, perm=perm, rs=rs, wait=wait))
    return matches
