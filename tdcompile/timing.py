"""Timing for ``tdcompile bench``: interleaved columns, agreed warm-ups, medians, max over ranks."""
from __future__ import annotations

import random

import torch
import torch.distributed as dist

from tdcompile.engine import Graphed, Timer

WARMUP_MS = 300.0
ROUNDS = 40
"""Interleaved rounds: the columns of a row take turns, so drift (clocks, heat) hits all alike."""
TIMED_MS = 0.0
"""Least timed time per column (all rounds together); ``tdcompile bench`` sets 1500 on a GPU, so
a 1 ms prefill row gets ~1500 samples, not ``iters``. With this and the shuffled order, identical
code read 0.996-1.006 apart (``inductor / again`` in benchmarks/results
bench-h200-tp2-20261127-102409.json and bench-h200-tp4-20261127-104639.json)."""
MAX_CALLS = 2000
"""Most timed calls per column (all rounds)."""


def _agreed_int(n: int, timer: Timer) -> int:
    t = torch.tensor([n], device="cuda" if timer.cuda else "cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)    # every rank runs the same number (collectives)
    return int(t.item())


def round_order(cols: list, r: int) -> list:
    """The columns' order in round ``r``: a permutation seeded by ``r`` (the same on every rank).

    Not a fixed rotation: there a column always follows the same one, and what the GPU ran just
    before shows. In a 2xH200 run (benchmarks/results/bench-h200-tp2-20261127-100651) three columns
    running identical code read 0.828, 0.857 and 0.860 ms on attn prefill; the fastest was the one
    that always followed eager (whose launch gaps leave the GPU idle). Shuffled, every column
    follows every other about equally often."""
    return random.Random(0x7D15 + r).sample(list(cols), len(cols))


def measure_interleaved(cases: dict, timer: Timer, iters: int, after_timing=None, prepared=None) -> dict:
    """``{column: median ms}`` for ``cases = {column: (fn, rewind, graph)}``, the max over ranks.

    Each case is compiled/captured, then warmed for at least ``WARMUP_MS`` (at least 3 calls),
    then the columns take turns for ``ROUNDS`` rounds (``round_order``), so no column is measured
    cold or minutes apart from another.  Timed calls per column: at least ``iters``, and enough
    for ``TIMED_MS`` of the slowest column (at most ``MAX_CALLS``).
    ``prepared(column)`` runs right after that column's compile, capture and warm-up (columns are
    prepared one after another, so the bench can tell which ops each one ran).
    ``after_timing(runs)`` runs once after the last timed call (the bench traces there)."""
    runs, slowest = {}, 1e-3
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
        slowest = max(slowest, one)
        for _ in range(_agreed_int(min(200, max(3, int(WARMUP_MS / one))), timer)):
            rewind()
            fn()
        runs[col] = (fn, rewind)
        if prepared is not None:
            prepared(col)
    times = {c: [] for c in runs}
    if not runs:
        return {}
    calls = min(MAX_CALLS, max(iters, int(TIMED_MS / slowest)))   # per column, all rounds
    per = _agreed_int(max(1, -(-calls // ROUNDS)), timer)
    cols = list(runs)
    for r in range(ROUNDS):
        for c in round_order(cols, r):
            fn, rewind = runs[c]
            for _ in range(per):
                rewind()
                a = timer.mark()
                fn()
                times[c].append(timer.ms(a, timer.mark()))
    if after_timing is not None:
        after_timing(runs)
    device = torch.device("cuda" if timer.cuda else "cpu")
    return {c: measure_values(t, device) for c, t in times.items()}


def measure_bursts(runs: dict, timer: Timer, calls: int, bursts: int = 5) -> dict:
    """``{column: ms per call}`` of ``runs = {column: (fn, rewind)}`` called ``calls`` times back
    to back with no host sync in between: the median over ``bursts`` bursts (columns shuffled per
    burst, as ``round_order``), the max over ranks.

    Why: ``measure_interleaved`` syncs the host after every call, so the ranks start each call
    apart and the first collective of the step absorbs the difference. On 4xH200 that was 140-240
    us on a 2.5 ms decode step (benchmarks/results/trace-summary-h200-tp4-*), paid by every column
    with a collective, which hides kernel gains. A burst pays it once per ``calls`` calls, like
    an engine that keeps the next step's inputs on the GPU; ``rewind`` (GPU work) runs between
    calls as it does there. Ranks agree on a host collective before each burst."""
    device = torch.device("cuda" if timer.cuda else "cpu")
    times = {c: [] for c in runs}
    for k in range(bursts):
        for c in round_order(list(runs), 1000 + k):
            fn, rewind = runs[c]
            _agreed_int(k, timer)                     # start each burst together
            a = timer.mark()
            for _ in range(calls):
                rewind()
                fn()
            times[c].append(timer.ms(a, timer.mark()) / calls)
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
