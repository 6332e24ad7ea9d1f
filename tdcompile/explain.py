"""``tdcompile.explain``: compile a model with tdist and return what the compiler did."""
from __future__ import annotations

import itertools
from typing import Optional

import torch

from tdcompile import backend
from tdcompile.report import Report


def explain(model, *args, options: Optional[dict] = None, fullgraph: bool = False, **kwargs) -> Report:
    """Compile ``model`` with ``backend="tdist"``, run it once on ``args``/``kwargs`` (every rank
    must call this: the forward runs collectives) and return the :class:`Report`: ``.matches``
    (pattern, module, shape, choice, candidate times and their source, reason), ``.graphs``
    (code before/after), ``.graph_decisions`` (sequence parallel or not, per graph) and
    ``.errors`` (graphs compiled unrewritten because the pass raised). Dynamo is reset first and
    graph ids restart at 0, so the report covers exactly this compile. The compiled output of
    that call is kept as ``report.output``. On a GPU, a match whose shape is not yet measured is
    measured while compiling (all ranks together) and reported with those times; only a
    dynamic-M match left to the op shows ``"auto"`` (its first call measures it)."""
    report = Report()
    torch._dynamo.reset()  # compile afresh so every graph goes through the pass
    backend._graph_ids = itertools.count()  # graph ids count per explain() call
    backend._sinks.append(report)
    try:
        compiled = torch.compile(model, backend="tdist", options=options or {}, fullgraph=fullgraph)
        with torch.no_grad():
            report.output = compiled(*args, **kwargs)
    finally:
        backend._sinks.remove(report)
    return report
