"""Small helpers shared by the passes: node predicates, GEMM recognition, fake-tensor
metadata for new nodes, module paths, and safe node insertion."""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.utils._pytree import tree_map

log = logging.getLogger("tdcompile.passes")

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
tdist = torch.ops.tdist

RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)
FUSABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def quiet():
    """Silence the matchers' debug log (a matcher run only to know what another one claims)."""
    drop = lambda record: False  # noqa: E731
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class NoMatch(Exception):
    """Raised inside a matcher with the reason the candidate stays unfused."""


def is_call(n: Any, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def val(n: fx.Node):
    return n.meta.get("val")


def shape(n: fx.Node) -> tuple:
    return tuple(val(n).shape)


def concrete(x) -> Optional[int]:
    """int for a static size, None for a symbolic one."""
    return x if isinstance(x, int) else None


def reshape_arg(dims: Iterable) -> list:
    """A reshape target for ``dims``: ints where static, ``-1`` for (at most) one symbolic dim."""
    dims = list(dims)
    sym = [i for i, d in enumerate(dims) if concrete(d) is None]
    if len(sym) > 1:
        raise NoMatch(f"more than one dynamic dim in {dims}")
    return [-1 if i in sym else d for i, d in enumerate(dims)]


def single_user(n: fx.Node) -> Optional[fx.Node]:
    return next(iter(n.users)) if len(n.users) == 1 else None


def wait_of(coll: fx.Node) -> fx.Node:
    """The ``wait_tensor`` that is the only user of a functional collective."""
    w = single_user(coll)
    if not is_call(w, c10d.wait_tensor.default):
        raise NoMatch(f"{coll.name} is not followed by a single wait_tensor")
    return w


@dataclass
class Gemm:
    """``mm(a, b)`` or ``addmm(bias, a, b)`` with default alpha/beta.

    ``a``, ``b`` and ``bias`` are read from the node's arguments when used: a match found
    before other matches are rewritten must see the graph as it is at its own rewrite (an
    earlier rewrite may have replaced the node that produced ``a``). ``mnk`` is fixed when the
    GEMM is recognised, so reports can still show it after the node is gone."""
    node: fx.Node
    mnk: tuple = field(init=False)

    def __post_init__(self):
        (m, k), (_, n) = shape(self.a), shape(self.b)
        self.mnk = (m, n, k)

    @property
    def a(self) -> fx.Node:
        return self.node.args[-2]

    @property
    def b(self) -> fx.Node:
        return self.node.args[-1]

    @property
    def bias(self) -> Optional[fx.Node]:
        return self.node.args[0] if self.node.target is aten.addmm.default else None


def as_gemm(n: Any) -> Optional[Gemm]:
    if is_call(n, aten.mm.default) and len(n.args) == 2 and not n.kwargs:
        return Gemm(n)
    if (is_call(n, aten.addmm.default) and len(n.args) == 3 and n.kwargs.get("beta", 1) == 1
            and n.kwargs.get("alpha", 1) == 1):
        if len(shape(n.args[0])) != 1:
            return None
        return Gemm(n)
    return None


def producer_gemm(x: fx.Node) -> tuple[Gemm, list[fx.Node]]:
    """Walk back from ``x`` (a collective's input) through reshapes to the GEMM producing it.
    Every node on the way, ``x`` and the GEMM included, must have exactly one user: otherwise
    the GEMM would still be needed and would run twice. Returns the GEMM and the reshape chain
    (GEMM side first)."""
    chain = []
    while True:
        if len(x.users) != 1:
            raise NoMatch(f"{x.name} has {len(x.users)} users")
        if not is_call(x, *RESHAPES):
            break
        chain.append(x)
        x = x.args[0]
    gemm = as_gemm(x)
    if gemm is None:
        raise NoMatch(f"producer {x.name} ({x.target}) is not a matmul")
    return gemm, chain[::-1]


def check_dtype(n: fx.Node) -> torch.dtype:
    dt = val(n).dtype
    if dt not in FUSABLE_DTYPES:
        raise NoMatch(f"dtype {dt} not supported")
    return dt


def module_path(n: fx.Node) -> str:
    """``model.layers.0.mlp.down_proj`` from Dynamo's ``nn_module_stack``."""
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return "?"
    path = list(stack.values())[-1][0]
    path = re.sub(r"getattr\((.*?), '(\w+)'\)", r"\1.\2", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"^L\['self'\]\.?|^L\['(\w+)'\]", lambda mo: mo.group(1) or "", path)
    path = re.sub(r"\._modules\['(\w+)'\]", r".\1", path)
    return path.lstrip(".") or "<root>"


def fake_call(target: Callable, args: tuple, kwargs: Optional[dict] = None):
    """Run ``target`` on the fake values of ``args`` (for ``node.meta['val']``)."""
    kwargs = kwargs or {}
    to_val = lambda a: val(a) if isinstance(a, fx.Node) else a  # noqa: E731
    fargs, fkwargs = tree_map(to_val, args), tree_map(to_val, kwargs)
    mode = detect_fake_mode([v for v in torch.utils._pytree.tree_leaves((fargs, fkwargs))
                             if isinstance(v, torch.Tensor)])
    if mode is None:
        return target(*fargs, **fkwargs)
    with mode:
        return target(*fargs, **fkwargs)


def emit(graph: fx.Graph, target: Callable, args: tuple, kwargs: Optional[dict] = None,
         like: Optional[fx.Node] = None) -> fx.Node:
    """Insert a call (at the graph's current insertion point) with its fake value set, and the
    source-location metadata of ``like`` copied so dumps and reports point at the model."""
    node = graph.call_function(target, args, kwargs or {})
    node.meta["val"] = fake_call(target, args, kwargs)
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    return node


def emit_getitem(graph: fx.Graph, src: fx.Node, idx: int, like: Optional[fx.Node] = None) -> fx.Node:
    import operator

    node = graph.call_function(operator.getitem, (src, idx))
    node.meta["val"] = val(src)[idx]
    if like is not None and "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = like.meta["nn_module_stack"]
    return node


def _late_ancestors(node: fx.Node, after: fx.Node, forbidden: set) -> list[fx.Node]:
    """Ancestors of ``node`` (itself included) placed after ``after``, in graph order.
    Raises NoMatch if one is impure or in ``forbidden`` (depends on the collective)."""
    order = {n: i for i, n in enumerate(after.graph.nodes)}
    todo, seen = [], set()

    def visit(n: fx.Node):
        if n in seen or order[n] <= order[after]:
            return
        if n in forbidden:
            raise NoMatch(f"{n.name} depends on the collective")
        if n.op != "call_function" or n.is_impure():
            raise NoMatch(f"cannot move {n.name} above the collective")
        seen.add(n)
        for inp in n.all_input_nodes:
            visit(inp)
        todo.append(n)

    visit(node)
    return sorted(todo, key=order.get)


def check_hoistable(node: fx.Node, after: fx.Node, forbidden: set) -> None:
    """Match-time check that ``hoist_inputs`` will succeed."""
    _late_ancestors(node, after, forbidden)


def hoist_inputs(node: fx.Node, anchor: fx.Node, forbidden: set) -> None:
    """Move the (pure) ancestors of ``node`` that come after ``anchor`` to just before it, so a
    fused op placed at ``anchor`` sees all its inputs."""
    for n in _late_ancestors(node, anchor, forbidden):
        anchor.prepend(n)


def descendants(n: fx.Node) -> set:
    out, stack = set(), [n]
    while stack:
        for u in stack.pop().users:
            if u not in out:
                out.add(u)
                stack.append(u)
    return out


def erase_dead(nodes: Iterable[fx.Node]) -> None:
    """Erase replaced nodes (users first). Only nodes that have no users left are removed."""
    nodes = set(nodes)
    if not nodes:
        return
    order = {n: i for i, n in enumerate(next(iter(nodes)).graph.nodes)}
    for n in sorted(nodes, key=lambda n: -order[n]):   # KeyError: a node erased by an earlier rewrite
        if not n.users:
            n.graph.erase_node(n)
