"""``all_gather -> matmul(s)`` => ``tdist.all_gather_gemm`` (one op, several weights).

Column-parallel linears fed by a sequence-parallel residual (``torch_sp`` plan, or our
sequence-parallel rewrite) gather once and feed q/k/v (or gate/up)::

    ag  = _c10d_functional.all_gather_into_tensor(x, W, group)     # [W*B, S/W, K]
    g   = _c10d_functional.wait_tensor(ag)
    [sp = aten.split(g, B); g = aten.cat([sp[0], ..], 1)]           # gather on dim 1: [B, S, K]
    q   = aten.mm(aten.reshape(g, [B*S, K]), wq)                    # one or more consumers
    k   = aten.mm(aten.reshape(g, [B*S, K]), wk)

After::

    f   = tdist.all_gather_gemm(aten.reshape(x, [-1, K]), [wq, wk], W, group, False, impl)
    q   = f[1][0]; k = f[1][1]                                      # rows in rank order
    [q  = reshape -> split(B) -> cat(dim 1) -> reshape(q)]          # same row permutation,
                                                                    # applied to the outputs
Row permutations commute with a row-wise matmul, so a gather on a dim other than the
last is done on dim 0 and its permutation moved onto the (N-wide) outputs. Other users of
the gathered tensor get it from the op (``return_a=True``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from tdcompile.passes.graph_utils import (RESHAPES, SPLITS, NoMatch, aten, as_gemm, c10d, check_dtype, concrete,
                                          check_hoistable, descendants, emit, emit_getitem, erase_dead, hoist_inputs, is_call, log,
                                          module_path, quiet, reshape_arg, shape, tdist, wait_of)
from tdcompile.passes.match import Match, SingleGemmMatch


@dataclass
class AllGatherGemmMatch(Match):
    ag: fx.Node
    wait: fx.Node
    gathered: fx.Node           # the tensor the matmuls read (wait, or the cat for dim != 0)
    perm: Optional[tuple]       # (split, cat, dim) when gathered on dim != 0
    gemms: list                 # Gemm consumers
    views: list                 # 2-D reshapes between gathered and the gemms
    return_a: bool
    pattern: str = field(init=False, default="all_gather_gemm")

    @property
    def shard(self) -> fx.Node:
        """Read at use: an earlier rewrite may have replaced the node that produced it."""
        return self.ag.args[0]

    def mnk(self):
        (m, k), ns = self.gemms[0].mnk[0::2], [g.mnk[1] for g in self.gemms]
        return concrete(m), sum(ns), k

    def describe(self) -> str:
        mods = [module_path(g.node).rsplit(".", 1)[-1] for g in self.gemms]
        return f"{len(self.gemms)} weights ({', '.join(mods)})" + (", returns A" if self.return_a else "")

    def replace_with(self, graph: fx.Graph, impl: str) -> None:
        k = shape(self.shard)[-1]
        like = self.gemms[0].node
        forbidden = descendants(self.wait)
        with graph.inserting_before(self.wait.next):   # right after the gather's wait
            a2d = emit(graph, aten.reshape.default, (self.shard, [-1, k]), like=like)
            fused = emit(graph, tdist.all_gather_gemm.default,
                         (a2d, [g.b for g in self.gemms], self.world_size, self.group_name, self.return_a, impl),
                         like=like)
            outs = emit_getitem(graph, fused, 1, like=like)
            for i, g in enumerate(self.gemms):
                out = emit_getitem(graph, outs, i, like=g.node)
                if self.perm is not None:
                    out = self._permute_rows(graph, out, g.mnk[1], g.node)
                if g.bias is not None:
                    out = emit(graph, aten.add.Tensor, (out, g.bias), like=g.node)
                g.node.replace_all_uses_with(out)
            if self.return_a:
                a_full = emit_getitem(graph, fused, 0, like=like)
                a_full = emit(graph, aten.reshape.default, (a_full, reshape_arg(shape(self.wait))), like=like)
                self.wait.replace_all_uses_with(a_full)
        # weights (and biases) defined after the gather move up, before the fused op reads them
        for g in self.gemms:
            for inp in (g.b, g.bias):
                if inp is not None:
                    hoist_inputs(inp, a2d, forbidden)
        dead = [g.node for g in self.gemms] + self.views
        if self.perm is not None:
            split, cat, _ = self.perm
            dead += [cat, *cat.args[0], split]
        erase_dead(dead + [self.wait, self.ag])

    def _permute_rows(self, graph: fx.Graph, out: fx.Node, n: int, like: fx.Node) -> fx.Node:
        """Rank-ordered rows -> the order the original cat produced (same split/cat, on outputs)."""
        split, cat, dim = self.perm
        full = [*shape(self.wait)[:-1], n]                               # [W*B, S/W, N]
        t = emit(graph, aten.reshape.default, (out, reshape_arg(full)), like=like)
        parts = emit(graph, split.target, (t, *split.args[1:]), like=like)  # W x [B, S/W, N]
        items = [emit_getitem(graph, parts, i, like=like) for i in range(self.world_size)]
        catted = emit(graph, aten.cat.default, (items, dim), like=like)  # [B, S, N]
        return emit(graph, aten.reshape.default, (catted, [-1, n]), like=like)


def _gather_permutation(wait: fx.Node, world: int):
    """Recognise funcol's lowering of a gather on dim != 0: split(wait, m, 0) -> cat(dim)."""
    users = list(wait.users)
    if len(users) != 1 or not is_call(users[0], *SPLITS):
        return wait, None
    split = users[0]
    getitems = list(split.users)
    cats = {u for gi in getitems for u in gi.users}
    if len(getitems) != world or len(cats) != 1:
        raise NoMatch("split after all_gather is not a single cat")
    cat = cats.pop()
    if not is_call(cat, aten.cat.default) or list(cat.args[0]) != sorted(getitems, key=lambda n: n.args[1]):
        raise NoMatch("split after all_gather is not a cat of its pieces in order")
    ndim = len(shape(cat))
    dim = cat.args[1] if len(cat.args) > 1 else 0
    dim = dim % ndim
    if dim == ndim - 1:
        raise NoMatch("gather on the last (K) dim")
    if any(concrete(d) is None for d in shape(wait)):
        raise NoMatch("dynamic shape in a gather on dim != 0")
    return cat, (split, cat, dim)


def _consumers(gathered: fx.Node, k: int, forbidden: set, claimed: set):
    """Split the users of the gathered tensor into matmuls reading it as A (directly or through
    one 2-D reshape) and others. A matmul already claimed by a reduction-side match (it feeds a
    gemm_reduce_scatter / gemm_all_reduce) counts as another user: one GEMM, one fusion."""
    def fusable(g, a):
        return g is not None and g.a is a and g.b not in forbidden and g.node not in claimed

    gemms, views, others = [], [], []
    for u in list(gathered.users):
        g = as_gemm(u)
        if fusable(g, gathered) and len(shape(gathered)) == 2:
            gemms.append(g)
            continue
        if is_call(u, *RESHAPES) and len(shape(u)) == 2 and shape(u)[-1] == k:
            gs = [as_gemm(x) for x in u.users]
            if u.users and all(fusable(g, u) for g in gs):
                gemms += gs
                views.append(u)
                continue
        others.append(u)
    return gemms, views, others


def find_all_gather_gemm_matches(graph: fx.Graph) -> list[Match]:
    from tdcompile.passes.all_reduce import find_all_reduce_matches
    from tdcompile.passes.gemm_reduce_scatter import find_gemm_reduce_scatter_matches

    with quiet():
        claimed = {m.gemm.node for m in find_gemm_reduce_scatter_matches(graph) + find_all_reduce_matches(graph)
                   if isinstance(m, SingleGemmMatch)}
    matches: list[Match] = []
    for ag in graph.find_nodes(op="call_function", target=c10d.all_gather_into_tensor.default):
        shard, world, group = ag.args[:3]
        try:
            wait = wait_of(ag)
            dtype = check_dtype(shard)
            gathered, perm = _gather_permutation(wait, world)
            k = shape(shard)[-1]
            gemms, views, others = _consumers(gathered, k, descendants(wait), claimed)
            if not gemms:
                raise NoMatch("no matmul consumer")
            if others:
                reshape_arg(shape(wait))  # returning A needs its shape (<= 1 dynamic dim)
            forbidden = descendants(wait)
            for g in gemms:                # weights must be movable above the fused op
                for inp in (g.b, g.bias):
                    if inp is not None:
                        check_hoistable(inp, wait, forbidden)
        except NoMatch as e:
            log.debug("all_gather %s stays unfused: %s", ag.name, e)
            continue
        matches.append(AllGatherGemmMatch(
            module=module_path(gemms[0].node).rsplit(".", 1)[0], group_name=group, world_size=world, dtype=dtype,
            ag=ag, wait=wait, gathered=gathered, perm=perm, gemms=gemms, views=views,
            return_a=bool(others)))
    return matches
