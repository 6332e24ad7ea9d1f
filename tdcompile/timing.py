"""Timing for ``tdcompile bench``: interleaved columns, agreed warm-ups, medians, max over ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist

from tdcompile.engine import Graphed, Timer

WARMUP_MS = 300.0
ROUNDS = 5
"""Interleaved rounds: the columns of a row take turns, so drift (clocks, heat) hits all alike."""


def _agreed_int(n: int, timer: Timer) -> int:
    t = torch.tensor([n], device="cuda" if timer.cuda else "cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)    # every rank runs the same number (collectives)
    return int(t.item())


def measure_interleaved(cases: dict, timer: Timer, iters: int) -> dict:
    """``{column: median ms}`` for ``cases = {column: (fn, rewind, graph)}``, the max over ranks.

    Each case is compiled/captured, then warmed for at least ``WARMUP_MS`` (at least 3 calls),
    then the columns take turns for ``ROUNDS`` rounds of ``iters / ROUNDS`` timed calls (the
    order rotating every round), so no column is measured cold or minutes apart from another."""
    runs = {}
    for col, (fn, rewind, graph) in cases.items():
        rewind = rewind or (lambda: None)
        if graph:
            fn = Graphed(fn, reset=rewind).run
        rewind()
        fn()                                       # compile / capture
        rewind()
        a = timer.mark()
        fn()
        one = max(timer.ms(a, timer.mark()), 1e-3)
        for _ in range(_agreed_int(min(200, max(3, int(WARMUP_MS / one))), timer)):
            rewind()
            fn()
        runs[col] = (fn, rewind)
    times = {c: [] for c in runs}
    if not runs:
        return {}
    per = max(1, -(-iters // ROUNDS))
    cols = list(runs)
    for r in range(ROUNDS):
        for c in cols[r % len(cols):] + cols[:r % len(cols)]:
            fn, rewind = runs[c]
            for _ in range(per):
                rewind()
                a = timer.mark()
                fn()
                times[c].append(timer.ms(a, timer.mark()))
    device = torch.device("cuda" if timer.cuda else "cpu")
    return {c: measure_values(t, device) for c, t in times.items()}


def measure(fn, timer: Timer, iters: int, graph: bool, rewind=None) -> float:
    """Median ms of one case (see ``measure_interleaved``)."""
    return measure_interleaved({"_": (fn, rewind, graph)}, timer, iters)["_"]


def measure_values(times: list, device) -> float:
    """Median of ``times``, the max over ranks (the slowest rank sets the pace)."""
    times = sorted(times)
    med = torch.tensor([times[len(times) // 2]], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return float(med.item())
