"""Normalize the post-grad ATen graph so the matchers see one form.

* ``aten.view`` / ``aten._unsafe_view`` -> ``aten.reshape`` (Inductor already does most of
  this; graphs traced elsewhere, and older torch, may still carry them).
* ``aten.copy(dst, src)`` with identical shape and dtype -> ``src``. HF's row-parallel
  linears all-reduce in place (``dist.all_reduce(out)``), which functionalization turns
  into ``wait_tensor`` followed by such a copy back into the GEMM output.
"""
from __future__ import annotations

import torch.fx as fx

from tdcompile.passes.graph_utils import aten, is_call, val


def normalize(graph: fx.Graph) -> int:
    """Returns the number of nodes changed."""
    changed = 0
    for n in list(graph.nodes):
        if is_call(n, aten.view.default, aten._unsafe_view.default):
            n.target = aten.reshape.default
            changed += 1
        elif is_call(n, aten.copy.default) and len(n.args) == 2 and not n.kwargs:
            dst, src = n.args
            vd, vs = val(dst), val(src)
            if vd is not None and vs is not None and vd.shape == vs.shape and vd.dtype == vs.dtype:
                n.replace_all_uses_with(src)
                graph.erase_node(n)
                changed += 1
    return changed
