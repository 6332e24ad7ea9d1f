"""All-reduce -> residual add -> RMSNorm => ``tdist.all_reduce_rmsnorm``.

In an unmodified HF Qwen3 / Llama under tensor parallelism every row-parallel linear's
all-reduce feeds the residual stream, and the sum feeds the next RMSNorm: o_proj ->
``post_attention_layernorm``, down_proj -> the next layer's ``input_layernorm``, the last
down_proj -> the final ``model.norm``. The decoder layer writes ``hidden_states = residual +
hidden_states``, the norm is ``Qwen3RMSNorm`` / ``LlamaRMSNorm``. In the post-grad graph
(after ``normalize``; ``cvt`` = ``prims.convert_element_type``, absent when the dtype is
already fp32)::

    ar   = _c10d_functional.all_reduce(x, "sum", group)     # x: the o_proj/down_proj output,
    red  = _c10d_functional.wait_tensor(ar)                   #    e.g. reshape(mm, [B, S, H])
    red' = aten.reshape(red, ...)                             # zero or more single-user reshapes
    s    = aten.add.Tensor(residual, red')                    # the new residual stream [B, S, H]
    h    = cvt(s, float32)                                    # users of s: h (or pow + mul), and
    p    = aten.pow.Tensor_Scalar(h, 2)                       #   the next residual add (any number)
    var  = aten.mean.dim(p, [-1], True)
    ve   = aten.add.Tensor(var, eps)                          # eps: a Python number
    r    = aten.rsqrt.default(ve)
    hn   = aten.mul.Tensor(h, r)
    hc   = cvt(hn, dtype)                                     # back to the input dtype
    out  = aten.mul.Tensor(weight, hc)                        # weight [H], dtype of s

After (the op goes where ``s`` was; ``x`` is reshaped to ``s``'s shape when the reduced value
was reshaped on its way to the add)::

    op     = tdist.all_reduce_rmsnorm(x, residual, weight, eps, group, impl)
    normed = op[0]          # replaces out (every user)
    new_s  = op[1]          # replaces s (every remaining user: the next layer's residual add)

The GEMM that produces ``x`` is left alone: the match starts at the all-reduce's input, so a
``gemm_all_reduce`` match on the same all-reduce is an alternative to this one, not a part of
it (``ar`` is exposed so the caller can tell them apart). Everything else is conservative: an
intermediate node with a user outside the pattern, a non-sum reduction, another eps form,
a missing or non-1-D weight, or any dtype mismatch leaves the candidate unfused, with the
reason logged at debug level.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from tdcompile.passes.all_reduce import _world_size
from tdcompile.passes.graph_utils import (RESHAPES, NoMatch, aten, c10d, check_dtype, check_hoistable, concrete,
                                          descendants, emit, erase_dead, hoist_inputs, is_call, log, module_path,
                                          shape, single_user, tdist, val, wait_of)
from tdcompile.passes.match import Match

prims = torch.ops.prims


@dataclass
class AllReduceRMSNormMatch(Match):
    """Nodes of the matched region. Inputs are read from the graph at rewrite time (``ar.args[0]``,
    ``add.args[residual_idx]``): an earlier rewrite of the previous layer's match replaces that
    layer's residual sum, which is this match's residual."""
    ar: fx.Node
    wait: fx.Node
    red_chain: list          # reshapes / copies between the wait and the add (wait side first)
    add: fx.Node             # s = residual + reduced
    residual_idx: int        # which operand of ``add`` is the residual
    norm_in: list            # reshapes between s and the norm input (usually none)
    norm_nodes: list         # cvt?, pow, mean, add(eps), rsqrt, mul, cvt?  (graph order)
    out: fx.Node             # weight * hc
    weight: fx.Node
    eps: float
    source: str              # module of the all-reduce's producer (o_proj / down_proj)
    pattern: str = field(init=False, default="all_reduce_rmsnorm")
    rows_hidden: tuple = field(init=False)   # the sum as [rows, hidden], fixed at match time (nodes go away)

    def __post_init__(self):
        s = shape(self.add)
        rows = 1
        for d in s[:-1]:
            rows = rows * d
        self.rows_hidden = (concrete(rows), s[-1])

    def mnk(self):
        return (*self.rows_hidden, 0)

    def describe(self) -> str:
        return f"after {self.source}, eps={self.eps:g}"

    def replace_with(self, graph: fx.Graph, impl: str) -> None:
        residual = self.add.args[self.residual_idx]
        hoist_inputs(self.weight, self.add, {self.add} | descendants(self.add))
        with graph.inserting_before(self.add):
            op = self._emit_op(graph, residual, impl)
            normed = _getitem(graph, op, 0, self.out)
            new_res = _getitem(graph, op, 1, self.add)
            if self.norm_in:                  # the norm ran on a reshaped sum: give its users that shape
                normed = emit(graph, aten.reshape.default, (normed, self.norm_in[-1].args[1]), like=self.out)
        self.out.replace_all_uses_with(normed)
        erase_dead([self.out, *self.norm_nodes, *self.norm_in])
        self.add.replace_all_uses_with(new_res)
        erase_dead([self.add, *self.red_chain, self.wait, self.ar, *self._producer()])

    def _emit_op(self, graph: fx.Graph, residual: fx.Node, impl: str) -> fx.Node:
        """The tdist op, emitted before ``add`` (the inserting point is set by the caller)."""
        x = self.ar.args[0]
        if not _same_shape(shape(x), shape(self.add)):   # reshaped on the way: reshape x (the sum is elementwise)
            target = next(n for n in reversed(self.red_chain) if is_call(n, *RESHAPES)).args[1]
            x = emit(graph, aten.reshape.default, (x, target), like=self.add)
        return emit(graph, tdist.all_reduce_rmsnorm.default, (x, residual, self.weight, self.eps, self.group_name,
                                                              impl), like=self.out)

    def _producer(self) -> list:
        """Nodes before the all-reduce that the op replaces too (none: the GEMM stays)."""
        return []


def _getitem(graph: fx.Graph, src: fx.Node, idx: int, like: fx.Node) -> fx.Node:
    node = graph.call_function(operator.getitem, (src, idx))
    node.meta["val"] = val(src)[idx]
    for key in ("nn_module_stack", "stack_trace"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def find_all_reduce_rmsnorm_matches(graph: fx.Graph) -> list[Match]:
    """Every ``all_reduce(sum) -> + residual -> RMSNorm`` region (see the module docstring).
    Expects a graph after ``normalize`` (``view``/``_unsafe_view`` are accepted as reshapes, and
    HF's same-shape ``aten.copy`` is looked through as well)."""
    matches: list[Match] = []
    for ar in graph.find_nodes(op="call_function", target=c10d.all_reduce.default):
        try:
            matches.append(_match(ar))
        except NoMatch as e:
            log.debug("all_reduce %s: no all_reduce_rmsnorm fusion: %s", ar.name, e)
    return matches


# ------------------------------------------------------------------------ matching
def _same_shape(a, b) -> bool:
    """Provably equal shapes, without adding guards on symbolic sizes."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _only_user(n: fx.Node, what: str) -> fx.Node:
    u = single_user(n)
    if u is None:
        raise NoMatch(f"{n.name} ({what}) has {len(n.users)} users")
    return u


def _is_cvt(n, dtype: Optional[torch.dtype] = None) -> bool:
    if is_call(n, prims.convert_element_type.default) and len(n.args) == 2 and not n.kwargs:
        return dtype is None or n.args[1] == dtype
    if is_call(n, aten._to_copy.default) and len(n.args) == 1 and set(n.kwargs) <= {"dtype"}:
        return dtype is None or n.kwargs.get("dtype") == dtype
    return False


def _is_same_copy(n: fx.Node, src: fx.Node) -> bool:
    """``aten.copy(dst, src)`` whose value is ``src`` (HF's in-place all-reduce before ``normalize``)."""
    if not (is_call(n, aten.copy.default) and len(n.args) == 2 and not n.kwargs and n.args[1] is src):
        return False
    vd, vs = val(n.args[0]), val(src)
    return vd is not None and vd.shape == vs.shape and vd.dtype == vs.dtype


def _other(mul: fx.Node, one: fx.Node):
    """The operand of the binary ``mul`` that is not ``one`` (None if it is not a binary op on it)."""
    if not is_call(mul, aten.mul.Tensor) or mul.kwargs or len(mul.args) != 2:
        return None
    a, b = mul.args
    if a is one and b is not one:
        return b
    if b is one and a is not one:
        return a
    return None


def _match(ar: fx.Node) -> AllReduceRMSNormMatch:
    x, op, group = ar.args[:3]
    if op != "sum":
        raise NoMatch(f"reduce op {op!r}")
    wait = wait_of(ar)
    dtype = check_dtype(x)

    # wait -> (reshape | copy)* -> add
    chain, cur = [], wait
    while True:
        u = _only_user(cur, "reduced value")
        if not ((is_call(u, *RESHAPES) and u.args[0] is cur) or _is_same_copy(u, cur)):
            break
        chain.append(u)
        cur = u
    add = u
    if not is_call(add, aten.add.Tensor) or add.kwargs or len(add.args) != 2:
        raise NoMatch(f"the reduced value feeds {add.name} ({add.target}), not a residual add")
    a, b = add.args
    if a is cur and b is cur:
        raise NoMatch(f"{add.name} adds the reduced value to itself")
    residual_idx = 1 if a is cur else 0
    residual = add.args[residual_idx]
    if not isinstance(residual, fx.Node):
        raise NoMatch(f"{add.name} adds a constant, not a residual tensor")
    s_val, r_val, c_val = val(add), val(residual), val(cur)
    if not (_same_shape(r_val.shape, s_val.shape) and _same_shape(c_val.shape, s_val.shape)):
        raise NoMatch(f"{add.name} broadcasts ({tuple(r_val.shape)} + {tuple(c_val.shape)})")
    if not (r_val.dtype == c_val.dtype == s_val.dtype == dtype):
        raise NoMatch(f"dtype mismatch in {add.name}: residual {r_val.dtype}, reduced {c_val.dtype}, "
                      f"sum {s_val.dtype}")
    if len(s_val.shape) < 1:
        raise NoMatch(f"{add.name} is a scalar")

    # s -> reshape* -> the norm. The sum's other users (the next residual add) stay.
    norm_in, s = [], add
    reshape_users = [u for u in add.users if is_call(u, *RESHAPES)]
    if len(reshape_users) == 1 and _starts_norm(reshape_users[0], dtype):
        s = reshape_users[0]
        norm_in.append(s)
        if len(s.users) != (1 if dtype != torch.float32 else 2):
            raise NoMatch(f"{s.name} (reshaped sum) has users outside the norm")
        if not _same_shape(shape(s)[-1:], shape(add)[-1:]):
            raise NoMatch(f"{s.name} changes the last (normalized) dim")
        order = {n: i for i, n in enumerate(add.graph.nodes)}
        late = [a for a in s.args[1] if isinstance(a, fx.Node) and order[a] > order[add]] \
            if isinstance(s.args[1], (list, tuple)) else [s.args[1]]
        if late:
            raise NoMatch(f"the target shape of {s.name} is computed after {add.name}")
    out, norm_nodes, weight, eps = _match_rmsnorm(s, dtype)   # the sum's other users get new_residual
    check_hoistable(weight, add, {add} | descendants(add))
    return AllReduceRMSNormMatch(module=module_path(out), group_name=group, world_size=_world_size(group),
                                 dtype=dtype, ar=ar, wait=wait, red_chain=chain, add=add,
                                 residual_idx=residual_idx, norm_in=norm_in, norm_nodes=norm_nodes, out=out,
                                 weight=weight, eps=eps, source=module_path(x))


def _starts_norm(n: fx.Node, dtype: torch.dtype) -> bool:
    if dtype != torch.float32:
        return any(_is_cvt(u, torch.float32) for u in n.users)
    return any(is_call(u, aten.pow.Tensor_Scalar) for u in n.users)


def _match_rmsnorm(s: fx.Node, dtype: torch.dtype):
    """``s`` -> HF's RMSNorm (in the decomposed post-grad form). Returns (out, nodes, weight, eps)."""
    nodes = []
    if dtype == torch.float32:
        h = s                                   # .to(float32) is a no-op and leaves no node
    else:
        cvts = [u for u in s.users if _is_cvt(u, torch.float32)]
        if len(cvts) != 1:
            raise NoMatch(f"{s.name} has {len(cvts)} upcasts to float32 (want 1, the RMSNorm's)")
        h = cvts[0]
        nodes.append(h)
        if len(h.users) != 2:
            raise NoMatch(f"{h.name} (upcast sum) has {len(h.users)} users, want 2 (pow, mul)")
    pows = [u for u in h.users if is_call(u, aten.pow.Tensor_Scalar)]
    if len(pows) != 1:
        raise NoMatch(f"{h.name} has no single pow user (not an RMSNorm input)")
    pw = pows[0]
    if pw.args[0] is not h or pw.args[1] not in (2, 2.0) or pw.kwargs:
        raise NoMatch(f"{pw.name} is not x ** 2")
    mean = _only_user(pw, "x ** 2")
    last = len(shape(h)) - 1
    if not (is_call(mean, aten.mean.dim) and mean.args[0] is pw and len(mean.args) >= 3
            and list(mean.args[1]) in ([-1], [last]) and mean.args[2] is True and not mean.kwargs):
        raise NoMatch(f"{mean.name} ({mean.target}) is not mean(x ** 2, -1, keepdim=True)")
    add_eps = _only_user(mean, "variance")
    if not (is_call(add_eps, aten.add.Tensor, aten.add.Scalar) and add_eps.args[0] is mean
            and len(add_eps.args) == 2 and not add_eps.kwargs):
        raise NoMatch(f"{add_eps.name} ({add_eps.target}) is not variance + eps")
    eps = add_eps.args[1]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise NoMatch(f"eps of {add_eps.name} is not a constant number ({eps!r})")
    rsqrt = _only_user(add_eps, "variance + eps")
    if not is_call(rsqrt, aten.rsqrt.default):
        raise NoMatch(f"{rsqrt.name} ({rsqrt.target}) is not rsqrt(variance + eps)")
    mul_r = _only_user(rsqrt, "rsqrt")
    if _other(mul_r, rsqrt) is not h:
        raise NoMatch(f"{mul_r.name} is not x * rsqrt(...)")
    others = set(h.users) - {pw, mul_r}   # fp32: h is the sum itself, whose other users are the residual stream
    if others and dtype != torch.float32:
        raise NoMatch(f"{h.name} has users outside the norm: {sorted(o.name for o in others)}")
    nodes += [pw, mean, add_eps, rsqrt, mul_r]
    if val(mul_r).dtype != torch.float32:
        raise NoMatch(f"{mul_r.name}: the normalization does not run in float32")
    hc = mul_r
    if dtype != torch.float32:
        hc = _only_user(mul_r, "normalized fp32")
        if not _is_cvt(hc, dtype):
            raise NoMatch(f"{hc.name} is not the cast back to {dtype}")
        nodes.append(hc)
    out = _only_user(hc, "normalized")
    weight = _other(out, hc)
    if not isinstance(weight, fx.Node):
        raise NoMatch(f"no weight: {hc.name} feeds {out.name} ({out.target}), not weight * x")
    w_val = val(weight)
    if w_val is None or not _same_shape(w_val.shape, shape(h)[-1:]):
        raise NoMatch(f"{out.name}: the multiplier {weight.name} is not a [{shape(h)[-1]}] weight")
    if w_val.dtype != dtype or val(out).dtype != dtype:
        raise NoMatch(f"dtype mismatch: weight {w_val.dtype}, sum {dtype}")
    return out, nodes, weight, float(eps)
