"""``strategy="bound"``: every collective becomes a local no-op of the same shape.

TIMING ONLY -- the output is NOT a valid result. The compiled model then costs what it would
with communication that takes no time at all: the limit any comm hiding can reach, the
``bound`` column of ``tdcompile bench``.

Before / after (the wait goes; its users read the no-op instead)::

    ar = all_reduce(x, "sum", g);          w = wait_tensor(ar)   =>  w := x
    ag = all_gather_into_tensor(x, W, g);  w = wait_tensor(ag)   =>  w := repeat(x, [W, 1, ...])
    rs = reduce_scatter_tensor(x, op, W, g); w = wait_tensor(rs) =>  w := slice(x, 0, 0, rows/W)

The gathered tensor is still materialised (a local copy of the gathered size): a GEMM on the
gathered rows reads that many bytes in any implementation.
"""
from __future__ import annotations

import torch.fx as fx

from tdcompile.passes.graph_utils import aten, c10d, emit, shape, wait_of, NoMatch


def replace_collectives(graph: fx.Graph) -> int:
    """Rewrite every functional all_reduce / all_gather / reduce_scatter; returns how many."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (
                c10d.all_reduce.default, c10d.all_gather_into_tensor.default, c10d.reduce_scatter_tensor.default):
            continue
        try:
            wait = wait_of(node)
        except NoMatch:
            continue
        x = node.args[0]
        with graph.inserting_before(wait):
            if node.target == c10d.all_reduce.default:
                out = x
            elif node.target == c10d.all_gather_into_tensor.default:
                reps = [node.args[1]] + [1] * (len(shape(x)) - 1)
                out = emit(graph, aten.repeat.default, (x, reps), like=x)               # [W*m, ...]
            else:
                rows = shape(x)[0] // node.args[2]
                out = emit(graph, aten.slice.Tensor, (x, 0, 0, rows), like=x)           # [M/W, ...]
        wait.replace_all_uses_with(out)
        graph.erase_node(wait)
        graph.erase_node(node)
        count += 1
    return count
