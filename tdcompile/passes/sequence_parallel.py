"""Sequence-parallel rewrite: ``all_reduce -> row-local ops`` => ``reduce_scatter -> row-local
ops on 1/W of the rows -> all_gather`` (Megatron sequence parallelism, derived by the compiler).

Before (HF plan, one decoder layer; T = B*S tokens, replicated residual)::

    o   = mm(attn, wo);  r = wait(all_reduce(reshape(o, [B,S,H])))
    h   = add(resid, r);  n = rms_norm(h)                # row-local
    g   = mm(reshape(n, [T,H]), wg); u = mm(reshape(n, [T,H]), wu)

After (every tensor of the region holds this rank's T/W rows, as a [T/W, C] matrix)::

    r'  = wait(reduce_scatter(reshape(o, [T,H])))       # -> gemm_reduce_scatter
    h'  = add(slice_rows(resid), r');  n' = rms_norm(h') # replicated inputs sliced locally
    n   = wait(all_gather(n'))                           # -> all_gather_gemm (gate, up)
    g   = mm(n, wg); u = mm(n, wu)

Row-sharding propagates through row-local consumers (elementwise ops, residual adds,
reductions over the last dim, dtype casts, reshapes that keep the last dim); it continues
across layers, so the residual stays sharded through the stack. The all_gather goes right
before matmul consumers and before any other consumer or graph output. When T is not a
multiple of W the rows are zero-padded to the next multiple (padding sits in the GEMM
input, rows past T are sliced off after the gather).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.fx as fx

from tdcompile.cost_model import Decision
from tdcompile.passes.graph_utils import (RESHAPES, NoMatch, as_gemm, aten, c10d, concrete, emit, is_call, log,
                                          producer_gemm, shape, val, wait_of)

prims = torch.ops.prims
_POINTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar,
              aten.rsqrt.default, aten.sqrt.default, aten.neg.default, aten.silu.default, aten.gelu.default,
              aten.relu.default, aten.sigmoid.default, aten.tanh.default, aten.exp.default, aten.clone.default,
              aten._to_copy.default, prims.convert_element_type.default, aten.alias.default}
_LAST_DIM_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}


def _all_reduces(graph: fx.Graph):
    out = []
    for ar in graph.find_nodes(op="call_function", target=c10d.all_reduce.default):
        try:
            if ar.args[1] == "sum":
                out.append((ar, wait_of(ar)))
        except NoMatch:
            pass
    return out


def _tokens(n: fx.Node):
    s = shape(n)
    return math.prod(s[:-1]) if s else None


def decide(graph: fx.Graph, options, profile) -> Decision:
    """Sequence parallel for this graph? ``choice`` is ``"sequence_parallel"`` or ``"all_reduce"``.
    ``strategy="sequence_parallel"``: whenever possible; ``"auto"``: when the cost model predicts
    the sequence-parallel graph (best candidate per match, summed) faster than the all-reduce one."""
    def no(reason, pred=None):
        log.debug("sequence parallel skipped: %s", reason)
        return Decision("all_reduce", pred or {}, reason)

    if options.strategy not in ("sequence_parallel", "auto"):
        return no(f"strategy={options.strategy!r}")
    ars = _all_reduces(graph)
    if not ars:
        return no("no all_reduce in the graph")
    t = _tokens(ars[0][0].args[0])
    if t is None or concrete(t) is None:
        return no("dynamic token count (sequence parallel is decided per static shape)")
    if len({ar.args[2] for ar, _ in ars}) != 1:
        return no("all_reduces over several groups")
    if t < options.min_sp_rows:
        return no(f"{t} rows < min_sp_rows={options.min_sp_rows}")
    if options.strategy == "sequence_parallel":
        return Decision("sequence_parallel", {}, "strategy='sequence_parallel'")
    if profile is None:
        return no("no device profile: keeping all_reduce")
    base, sp = _predicted_totals(graph, profile)
    pred = {"all_reduce": round(base, 2), "sequence_parallel": round(sp, 2)}
    if sp < base * 0.99:
        return Decision("sequence_parallel", pred, f"sequence parallel predicted {base / sp:.2f}x faster for {t} rows")
    return no(f"sequence parallel not predicted >1% faster for {t} rows", pred)


def graph_time_us(graph: fx.Graph, profile) -> float:
    """Predicted time of a graph's GEMMs and collectives: every GEMM at cuBLAS speed and every
    collective through NCCL, minus what each match's best candidate saves over that."""
    from tdcompile import cost_model as cm
    from tdcompile.passes.all_gather_gemm import find_all_gather_gemm_matches
    from tdcompile.passes.all_reduce import find_all_reduce_matches
    from tdcompile.passes.gemm_reduce_scatter import find_gemm_reduce_scatter_matches

    total = 0.0
    for n in graph.nodes:
        g = as_gemm(n)
        v = val(n) if n.op == "call_function" else None
        if g is not None:
            total += cm.gemm_us(profile, *g.mnk, v.element_size())
        elif is_call(n, c10d.all_reduce.default, c10d.all_gather_into_tensor.default,
                     c10d.reduce_scatter_tensor.default):
            kind = {c10d.all_reduce.default: "all_reduce", c10d.all_gather_into_tensor.default: "all_gather",
                    c10d.reduce_scatter_tensor.default: "reduce_scatter"}[n.target]
            inp = val(n.args[0])
            w = n.args[1] if kind == "all_gather" else (n.args[2] if kind == "reduce_scatter" else None)
            w = w or dist.get_world_size(torch.distributed.distributed_c10d._resolve_process_group(n.args[2]))
            nbytes = inp.numel() * inp.element_size() * (w if kind == "all_gather" else 1)
            total += cm.nccl_us(profile, kind, nbytes, w)
    matches = find_all_gather_gemm_matches(graph) + find_gemm_reduce_scatter_matches(graph) + \
        find_all_reduce_matches(graph)
    for m in matches:
        mm, n, k = m.mnk()
        pred = cm.predict(m.pattern, m=mm, n=n, k=k, world_size=m.world_size,
                          elem=torch.empty((), dtype=m.dtype).element_size(), profile=profile)
        total -= max(0.0, pred["unfused"] - min(pred.values()))
    return total


def _predicted_totals(graph: fx.Graph, profile) -> tuple[float, float]:
    """Predicted time of the graph as it is and after the sequence-parallel rewrite."""
    sp_graph = copy.deepcopy(graph)
    rewrite(sp_graph)
    return graph_time_us(graph, profile), graph_time_us(sp_graph, profile)


class _Rewriter:
    def __init__(self, graph: fx.Graph, t: int, group: str):
        self.graph, self.t, self.group = graph, t, group
        self.w = dist.get_world_size(torch.distributed.distributed_c10d._resolve_process_group(group))
        self.rank = dist.get_rank(torch.distributed.distributed_c10d._resolve_process_group(group))
        self.t_pad = -(-t // self.w) * self.w
        self.rows = self.t_pad // self.w
        self.shard: dict[fx.Node, fx.Node] = {}
        self.gathered: dict[fx.Node, fx.Node] = {}

    # -- building blocks -------------------------------------------------------------------
    def _e(self, target, args, like, kwargs=None):
        return emit(self.graph, target, args, kwargs, like=like)

    def pad_rows(self, x2d: fx.Node, like) -> fx.Node:
        if self.t_pad == self.t:
            return x2d
        return self._e(aten.constant_pad_nd.default, (x2d, [0, 0, 0, self.t_pad - self.t]), like)

    def to_rows(self, a: fx.Node, like) -> fx.Node:
        """This rank's rows of a replicated full activation (a local slice, no communication)."""
        a2d = self._e(aten.reshape.default, (a, [self.t, shape(a)[-1]]), like)
        a2d = self.pad_rows(a2d, like)
        return self._e(aten.slice.Tensor, (a2d, 0, self.rank * self.rows, (self.rank + 1) * self.rows), like)

    def gather_padded(self, shard: fx.Node, like: fx.Node) -> fx.Node:
        """all_gather of a shard: [T_pad, C] (one per shard, placed before its first consumer)."""
        if shard not in self.gathered:
            with self.graph.inserting_before(like):
                g = self._e(c10d.all_gather_into_tensor.default, (shard, self.w, self.group), like)
                self.gathered[shard] = self._e(c10d.wait_tensor.default, (g,), like)
        return self.gathered[shard]

    def gather(self, n: fx.Node, like: fx.Node) -> fx.Node:
        """The replicated value of sharded ``n``, in n's original shape."""
        g = self.gather_padded(self.shard[n], like)
        with self.graph.inserting_before(like):
            if self.t_pad != self.t:
                g = self._e(aten.slice.Tensor, (g, 0, 0, self.t), like)
            if len(shape(n)) != 2:
                g = self._e(aten.reshape.default, (g, list(shape(n))), like)
        return g

    def gather_into_gemm(self, n: fx.Node) -> bool:
        """``mm(a, b)`` with sharded 2-D ``a``: ``mm(all_gather(a'), b)`` directly (so it becomes
        an all_gather_gemm), slicing padded rows off the *output*."""
        gemm = as_gemm(n)
        if gemm is None or gemm.a not in self.shard or len(shape(gemm.a)) != 2 or gemm.b in self.shard:
            return False
        g = self.gather_padded(self.shard[gemm.a], n)
        with self.graph.inserting_before(n):
            out = self._e(aten.mm.default, (g, gemm.b), n)
            if gemm.bias is not None:
                out = self._e(aten.add.Tensor, (out, gemm.bias), n)
            if self.t_pad != self.t:
                out = self._e(aten.slice.Tensor, (out, 0, 0, self.t), n)
        n.replace_all_uses_with(out)
        self.graph.erase_node(n)
        return True

    # -- the region --------------------------------------------------------------------------
    def convert_all_reduce(self, ar: fx.Node, wait: fx.Node) -> None:
        x = ar.args[0]
        h = shape(x)[-1]
        with self.graph.inserting_before(wait):
            try:
                gemm, _ = producer_gemm(x)
            except NoMatch:
                gemm = None
            if gemm is not None and shape(gemm.node) != (self.t, h):
                gemm = None                   # the reshapes between GEMM and all_reduce regroup its rows
            if gemm is not None and self.t_pad != self.t:   # pad the GEMM input: mm -> reduce_scatter stays adjacent
                a = self.pad_rows(gemm.a, wait)
                x2d = self._e(gemm.node.target, (gemm.bias, a, gemm.b) if gemm.bias is not None else (a, gemm.b),
                              gemm.node)
            else:
                x2d = self.pad_rows(self._e(aten.reshape.default, (x, [self.t, h]), wait), wait)
            rs = self._e(c10d.reduce_scatter_tensor.default, (x2d, "sum", self.w, self.group), wait)
            self.shard[wait] = self._e(c10d.wait_tensor.default, (rs,), wait)   # [T_pad/W, H]

    def row_local_args(self, n: fx.Node):
        """Arguments of the shard version of ``n``, or None when ``n`` is not row-local."""
        if is_call(n, *RESHAPES):
            inp = n.args[0]
            ok = inp in self.shard and shape(n) and shape(n)[-1] == shape(inp)[-1] and _tokens(n) == self.t
            return "identity" if ok else None
        if n.op != "call_function" or (n.target not in _POINTWISE and n.target not in _LAST_DIM_REDUCTIONS):
            return None
        if _tokens(n) != self.t:
            return None
        args = list(n.args)
        if n.target in _LAST_DIM_REDUCTIONS:
            ndim = len(shape(args[0]))
            dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            keep = args[2] if len(args) > 2 else n.kwargs.get("keepdim", False)
            if args[0] not in self.shard or [d % ndim for d in dims] != [ndim - 1] or not keep:
                return None
            args[1] = [-1]
        else:
            # the output's channels must come from a sharded input: a broadcast that widens a sharded
            # [T, 1] by a [1, N] operand is a K=1 matmul (Inductor decomposes those into mul), and its
            # "weight" may differ per rank, so it is gathered before, like any matmul
            width = shape(n)[-1] if shape(n) else 1
            if width != 1 and not any(shape(a)[-1] == width for a in args if isinstance(a, fx.Node)
                                      and a in self.shard and shape(a)):
                return None
        new = []
        for a in args:
            if not isinstance(a, fx.Node):
                new.append(a)
            elif a in self.shard:
                new.append(self.shard[a])
            elif shape(a) and _tokens(a) == self.t and shape(a) == shape(n)[:len(shape(a))] and len(shape(a)) == len(shape(n)):
                new.append(("rows", a))
            elif all(d == 1 for d in shape(a)[:-1]):
                new.append(("bcast", a))
            else:
                return None
        return new

    def run(self, ars) -> None:
        converted = {wait for _, wait in ars}
        for ar, wait in ars:
            self.convert_all_reduce(ar, wait)
        for n in list(self.graph.nodes):
            if n in converted or n.op == "placeholder":
                continue
            inputs = [a for a in n.all_input_nodes if a in self.shard]
            if not inputs:
                continue
            args = self.row_local_args(n) if n.op != "output" else None
            if args == "identity":
                self.shard[n] = self.shard[n.args[0]]
                continue
            if args is not None:
                with self.graph.inserting_before(n):
                    args = [self.to_rows(a[1], n) if isinstance(a, tuple) and a[0] == "rows" else
                            self._e(aten.reshape.default, (a[1], [shape(a[1])[-1]] if shape(a[1]) else []), n)
                            if isinstance(a, tuple) else a for a in args]
                    self.shard[n] = self._e(n.target, tuple(args), n, dict(n.kwargs))
                continue
            if self.gather_into_gemm(n):
                continue
            for a in inputs:   # a consumer that needs the whole tensor: gather first
                n.replace_input_with(a, self.gather(a, n))
        self.graph.eliminate_dead_code()
        for ar, wait in ars:   # collectives are not dead code to FX: drop the replaced ones
            for x in (wait, ar):
                if not x.users:
                    self.graph.erase_node(x)
        self.graph.eliminate_dead_code()


def rewrite(graph: fx.Graph) -> int:
    """Apply the rewrite in place; returns the number of all_reduces converted."""
    ars = _all_reduces(graph)
    if not ars:
        return 0
    t = _tokens(ars[0][0].args[0])
    if any(_tokens(ar.args[0]) != t for ar, _ in ars):
        log.debug("sequence parallel skipped: all_reduces over different token counts")
        return 0
    _Rewriter(graph, t, ars[0][0].args[2]).run(ars)
    return len(ars)
