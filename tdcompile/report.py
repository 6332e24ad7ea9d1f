"""The rewrite report: what matched, where in the model, shapes, predicted times, why."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from tabulate import tabulate


@dataclass
class Report:
    matches: list = field(default_factory=list)
    """One :class:`tdcompile.passes.match.Decided` per match, over every compiled graph."""
    graphs: list = field(default_factory=list)
    """``(before, after)`` readable code of each compiled graph, in compile order."""
    errors: list = field(default_factory=list)
    """Why a graph was compiled unrewritten (the pass raised): one message per graph."""
    graph_decisions: list = field(default_factory=list)
    """``(graph_id, Decision)``: sequence parallel or all_reduce, per graph, with predictions."""

    def by_pattern(self, pattern: str) -> list:
        return [m for m in self.matches if m.pattern == pattern]

    def rows(self) -> list[dict]:
        out = []
        for d in self.matches:
            m, n, k = d.shape
            out.append({"graph": d.graph_id, "pattern": d.pattern, "module": d.module,
                        "M": "dyn" if m is None else m, "N": n, "K": k, "dtype": str(d.match.dtype).split(".")[-1],
                        "choice": d.choice,
                        "candidates_us": ", ".join(f"{c} {t:g}" for c, t in d.decision.candidates_us.items()) or "-",
                        "source": d.decision.source,
                        "detail": d.match.describe(), "reason": d.reason})
        return out

    def __str__(self) -> str:
        rows = self.rows()
        if not rows:
            return "tdist: no communication patterns matched" + "".join(f"\nwarning: {e}" for e in self.errors)
        table = tabulate(rows, headers="keys", tablefmt="simple")
        fused = sum(d.rewritten for d in self.matches)
        for gid, d in self.graph_decisions:
            pred = ", ".join(f"{c} {t:g} us" for c, t in d.predicted_us.items())
            table += f"\ngraph {gid}: {d.choice} ({d.reason}{'; ' + pred if pred else ''})"
        for e in self.errors:
            table += f"\nwarning: {e}"
        return f"{table}\n{len(rows)} matches, {fused} rewritten into tdist ops, in {len(self.graphs)} graph(s)"

    def to_json(self) -> str:
        return json.dumps(self.rows(), indent=2)
