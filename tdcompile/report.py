"""The rewrite report: what matched, where in the model, shapes, candidate times, the decision
and why, and per graph whether sequence parallel was applied.

Graph ids count from 0 per ``tdcompile.explain()`` call (and per process otherwise)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from tabulate import tabulate

HEADERS = {"graph": "graph", "pattern": "pattern", "module": "module", "M": "M", "N": "N", "K": "K",
           "dtype": "dtype", "choice": "choice", "candidates_us": "candidates (us)", "source": "source",
           "reason": "reason"}
"""Columns of the printed table (``rows()`` keys -> header); ``rows()`` also has ``detail``."""


def module_name(module: str) -> str:
    """The module column: ``"-"`` where the match is in no module (a plain function)."""
    return "-" if module in ("", "?") else module


def format_candidates(candidates_us: dict) -> str:
    """``{"unfused": 80.9, "fused": 111.7}`` -> ``"unfused 80.9, fused 111.7"`` (``"-"`` if none)."""
    return ", ".join(f"{c} {t:g}" for c, t in candidates_us.items()) or "-"


def graph_line(graph_id: int, decision) -> str:
    """Whether sequence parallel was applied to a graph, and why (``decision.choice`` is
    ``"sequence_parallel"`` or ``"all_reduce"``, the latter meaning: left as it was)."""
    applied = "yes" if decision.choice == "sequence_parallel" else "no"
    times = format_candidates(decision.candidates_us)
    times = f"; predicted us: {times}" if decision.candidates_us else ""
    return f"graph {graph_id}: sequence parallel: {applied} ({decision.reason}{times})"


@dataclass
class Report:
    matches: list = field(default_factory=list)
    """One :class:`tdcompile.passes.match.Decided` per match, over every compiled graph."""
    graphs: list = field(default_factory=list)
    """``(before, after)`` readable code of each compiled graph, in compile order."""
    errors: list = field(default_factory=list)
    """Why a graph was compiled unrewritten (the pass raised): one message per graph."""
    graph_decisions: list = field(default_factory=list)
    """``(graph_id, Decision)``: sequence parallel applied or not, per graph, with predictions."""

    def by_pattern(self, pattern: str) -> list:
        return [m for m in self.matches if m.pattern == pattern]

    def rows(self) -> list[dict]:
        """One dict per match (the table's columns plus ``detail``), for JSON and tests."""
        out = []
        for d in self.matches:
            m, n, k = d.shape
            out.append({"graph": d.graph_id, "pattern": d.pattern, "module": module_name(d.module),
                        "M": "dyn" if m is None else m, "N": n, "K": k or "-",
                        "dtype": str(d.match.dtype).split(".")[-1], "choice": d.choice,
                        "candidates_us": format_candidates(d.decision.candidates_us),
                        "source": d.decision.source, "detail": d.match.describe(), "reason": d.reason})
        return out

    def __str__(self) -> str:
        rows = self.rows()
        lines = []
        if rows:
            table = [{h: r[k] for k, h in HEADERS.items()} for r in rows]
            for t, r in zip(table, rows):
                if r["detail"]:
                    t["module"] = f"{t['module']} ({r['detail']})"
            lines.append(tabulate(table, headers="keys", tablefmt="simple"))
        else:
            lines.append("no communication pattern matched")
        lines += [graph_line(gid, d) for gid, d in self.graph_decisions]
        lines += [f"warning: {e}" for e in self.errors]
        rewritten = sum(d.rewritten for d in self.matches)
        lines.append(f"{len(rows)} matches, {rewritten} rewritten into tdist ops, in {len(self.graphs)} graph(s)"
                     + (f", {len(self.errors)} compiled unrewritten after an error" if self.errors else ""))
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.rows(), indent=2)
