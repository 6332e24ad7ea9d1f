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
    (pattern, module, shape, choice, predicted_us, reason) and ``.graphs`` (code before/after).
    The compiled output of that call is kept as ``report.output``."""
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
