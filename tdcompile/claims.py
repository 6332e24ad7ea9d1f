"""Which match takes an all-reduce that several matches claim, and what the RMSNorm fusions save.

An all-reduce of a row-parallel linear followed by the residual add and an RMSNorm is matched
three ways: ``gemm_all_reduce_rmsnorm`` (GEMM + all-reduce + norm), ``all_reduce_rmsnorm`` and
``gemm_all_reduce`` (or a lone ``all_reduce``).  Each is decided on its own (measured gain over
its own ``unfused``); at most one may be rewritten.
"""
from __future__ import annotations

from tdcompile.cost_model import Decision
from tdcompile.passes.match import Decided


def _gain(d: Decided) -> float:
    """Measured (or predicted) microseconds the decision saves over unfused; 0 when unknown."""
    t = d.decision.candidates_us
    return max(0.0, t["unfused"] - t[d.choice]) if "unfused" in t and d.choice in t else 0.0


COVERS = {"gemm_all_reduce_rmsnorm": 2, "all_reduce_rmsnorm": 1}
"""How much of the graph a match covers beyond its all-reduce (others: 0): the GEMM + norm fusion,
then the norm fusion."""
CLOSE_GAIN = 0.9
"""A match covering more takes the all-reduce when its gain is at least this fraction of the best
one's.  The gains are measured against each op's own ``unfused`` (the RMSNorm op's NCCL reduces
a copy of its input, the GEMM op's the GEMM output in place), so gains a few percent apart do not
tell the two apart; the larger fusion also removes a kernel boundary the table does not price."""


def rmsnorm_savings(rms: list, others: list) -> float:
    """Microseconds the RMSNorm fusions (``rms``: decided ``all_reduce_rmsnorm`` /
    ``gemm_all_reduce_rmsnorm`` matches) save beyond the decided GEMM / all-reduce matches
    (``others``) of the same all-reduces: per all-reduce, the best fused RMSNorm gain minus the
    other match's gain, when larger. Only measured (or predicted) gains count."""
    other_gain = {d.match.ar: _gain(d) for d in others if getattr(d.match, "ar", None) is not None}
    best: dict = {}
    for d in rms:
        if d.choice != "unfused":
            best[d.match.ar] = max(best.get(d.match.ar, 0.0), _gain(d))
    return sum(max(0.0, g - other_gain.get(ar, 0.0)) for ar, g in best.items())


def one_claim_per_all_reduce(rms: list, others: list) -> list:
    """An all_reduce matched several ways (``gemm_all_reduce_rmsnorm``, ``all_reduce_rmsnorm``,
    ``gemm_all_reduce`` / ``all_reduce``), with more than one decided fused, goes to one of them:
    the one covering most of the graph (``COVERS``) among those whose gain is within
    ``CLOSE_GAIN`` of the best (an unmeasured ``"auto"`` or a forced strategy saves nothing known,
    so then the largest fusion); the others are kept unfused in the report, with the reason."""
    by_ar: dict = {}
    for d in rms + others:
        ar = getattr(d.match, "ar", None)
        if ar is not None and d.choice != "unfused":
            by_ar.setdefault(ar, []).append(d)
    for claims in by_ar.values():
        if len(claims) < 2:
            continue
        best = max(_gain(d) for d in claims)
        winner = max((d for d in claims if _gain(d) >= CLOSE_GAIN * best),
                     key=lambda d: (COVERS.get(d.pattern, 0), _gain(d)))
        why = "which saves the most or nearly, and covers the most of the graph" if best > 0 else \
            "no measured saving tells them apart and it covers the most of the graph"
        for loser in claims:
            if loser is not winner:
                loser.decision = Decision("unfused", loser.decision.candidates_us,
                                          f"its all_reduce goes to {winner.pattern} ({winner.choice}): {why}",
                                          loser.decision.source)
    return rms + others
