"""Timing the candidates of one measured-table key, on all ranks together.

For a :class:`tdcompile.measured.Key` every candidate implementation of the op runs on the
same random inputs; it must produce what ``unfused`` produces (within the dtype's rounding)
and must really have run (``ops.cuda.RAN``: a family that silently fell back to unfused is
not credited), on every rank, or it is recorded as ``inf``. Survivors are timed under CUDA
graphs: ``REPEAT`` back-to-back calls captured in one graph, replays timed with CUDA events,
median per call. ``measured.agreed_times`` then takes the max over ranks.

Bounded: one key costs a few hundred ms plus any first-time Triton compile; every wait
inside a fused kernel is itself bounded (``TDCOMPILE_SPIN_TIMEOUT_S``).
"""
from __future__ import annotations

import logging
import math
import statistics
import time

import torch

from tdcompile import measured
from tdcompile.config import family

log = logging.getLogger("tdcompile")
REPEAT = 8
"""Calls captured per CUDA graph."""
REPLAYS = 15
"""Timed graph replays (after 3 untimed ones)."""
HOST_CALLS = 10
"""Un-graphed calls per host-time round (``host_us``)."""

CANDIDATES = {
    "all_reduce": ["unfused", "fused:one_shot", "fused:two_shot", "fused:lamport", "fused:lamport2",
                   "symm_mem:one_shot", "symm_mem:two_shot"],
    "gemm_all_reduce": ["unfused", "fused", "fused:one_shot", "fused:two_shot", "symm_mem:one_shot",
                        "symm_mem:two_shot", "fused:lamport", "fused:lamport2", "fused:pipe2", "fused:pipe4",
                        "fused:pipe2_nccl", "fused:pipe4_nccl", "fused:ce2", "fused:ce4", "fused:chain2",
                        "fused:chain4"],
    "all_reduce_rmsnorm": ["unfused", "fused:one_shot", "fused:two_shot", "fused:lamport", "fused:lamport2"],
    "gemm_all_reduce_rmsnorm": ["unfused", "fused:one_shot", "fused:two_shot"],
    "all_gather_gemm": ["unfused", "fused", "symm_mem", "fused:ce"],
    "gemm_reduce_scatter": ["unfused", "fused", "symm_mem", "fused:ce"],
    "gemm": ["unfused"],
}
"""Candidate impls per op: a static list, the same on every rank (the order of the agreed vector).
A new kernel joins only with its GPU tests: a candidate the shipped tables lack makes every first
call of a shape re-measure it (``scripts/gpu_session.sh`` runs a new kernel's simulated-rank tests
first and, if they fail, leaves it out with ``TDCOMPILE_SKIP_CANDIDATES``).  ``fused:lamport2``
(``kernels/all_reduce_lamport2.py``, two-shot Lamport: 10.7 us vs 13.1 for ``two_shot`` at 128x5120
on 4xH200) joined once its tests passed (2026-11-27, after the ``tiles.preload`` fix); the session
script still gates it on its simulated-rank and real-process tests.  ``fused:chain2`` / ``fused:chain4``
(``kernels/gemm_all_reduce_chain.py``: the adds in cuBLAS's epilogue) joined on 2026-11-27 after
their simulated-rank and real-process tests passed on 2xH200 and 4xH100 (``CHAIN_GATE=1`` gates
them in ``scripts/gpu_session.sh``).  ``gemm`` (cuBLAS alone, no collective) is measured so that
``backend.measured_sequence_parallel`` can tell an all_gather_gemm's gather from its GEMMs."""


def candidates(op: str) -> list:
    """``CANDIDATES[op]`` minus those named in ``TDCOMPILE_SKIP_CANDIDATES``: comma-separated impls
    (``fused:lamport`` skips it for every op) or ``op/impl`` (``all_reduce_rmsnorm/fused:lamport``
    for one op).  Set it the same on every rank (torchrun passes the environment to all of them);
    ``unfused`` is always kept. Each is followed by its host-time entry (``measured.HOST``), except
    for ``gemm`` (cuBLAS alone: a device-time reference)."""
    import os
    skip = {c.strip() for c in os.environ.get("TDCOMPILE_SKIP_CANDIDATES", "").split(",")}
    impls = [c for c in CANDIDATES.get(op, ["unfused"])
             if c == "unfused" or (c not in skip and f"{op}/{c}" not in skip)]
    if op == "gemm":
        return impls
    return [n for c in impls for n in (c, measured.HOST + c)]


def _inputs(key: measured.Key, rank: int) -> tuple:
    """Random inputs of ``key``'s op, shaped as the pass emits them (``b`` a transposed weight)."""
    dt, dev = getattr(torch, key.dtype), torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device=dev).manual_seed(1234 + rank)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) / math.sqrt(shape[-1])).to(dt)

    m = key.m
    if key.op == "all_reduce":
        return (rnd(m, key.n),)                                                      # x [M, N]
    if key.op == "all_reduce_rmsnorm":
        return (rnd(m, key.n), rnd(m, key.n), (1 + rnd(key.n)).to(dt), 1e-6)        # x, residual, weight, eps
    b = rnd(key.n, key.k).t()                                                        # [K, N] (weight^T)
    if key.op == "gemm_all_reduce_rmsnorm":                                          # a, b, bias, residual, weight, eps
        return (rnd(m, key.k), b, None, rnd(m, key.n), (1 + rnd(key.n)).to(dt), 1e-6)
    if key.op == "all_gather_gemm":
        return (rnd(max(1, m // key.world), key.k), [b], key.world)                  # a_shard [M/w, K]
    return (rnd(m, key.k), b, None)                                                  # a [M, K]


def _call(key: measured.Key, impl: str, args: tuple, group_name: str):
    td = torch.ops.tdist
    if key.op == "gemm":             # cuBLAS alone: what an all_gather_gemm's GEMMs cost without the gather
        return torch.mm(args[0], args[1])
    if key.op == "all_reduce":
        return td.all_reduce(args[0], group_name, impl)
    if key.op == "all_reduce_rmsnorm":
        return td.all_reduce_rmsnorm(*args, group_name, impl)                      # (normed, new_residual)
    if key.op == "gemm_all_reduce_rmsnorm":
        return td.gemm_all_reduce_rmsnorm(*args, group_name, impl)                 # (normed, new_residual)
    if key.op == "gemm_all_reduce":
        return td.gemm_all_reduce(args[0], args[1], args[2], group_name, impl)
    if key.op == "gemm_reduce_scatter":
        return td.gemm_reduce_scatter(args[0], args[1], args[2], key.world, group_name, impl)
    return td.all_gather_gemm(args[0], args[1], args[2], group_name, False, impl)[1][0]


def _flat(out) -> torch.Tensor:
    """One tensor of an op's output(s), for comparing; never inside a timed call (a ``cat`` of the
    two 42 MB outputs of a 4096x5120 RMSNorm op costs ~40 us, the same for every candidate: it
    pulled their ratios towards 1 -- 402 vs 475 us read 0.846x where the ops alone are ~0.83x)."""
    return torch.cat([o.flatten() for o in out]) if isinstance(out, (tuple, list)) else out


def _close(out, ref) -> bool:
    out, ref = _flat(out), _flat(ref)
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return False
    tol = 1e-4 if out.dtype == torch.float32 else 2e-2
    err = (out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)
    return bool(err <= tol)


def capture(fn, repeat: int = REPEAT) -> "torch.cuda.CUDAGraph":
    """``fn`` called once on a side stream (warm), then captured ``repeat`` times in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()                                         # warm on the capture stream
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(repeat):
            fn()
    return g


def graph_us(fn, repeat: int = REPEAT, replays: int = REPLAYS) -> float:
    """Median microseconds per call of ``fn`` captured ``repeat`` times in one CUDA graph."""
    g = capture(fn, repeat)
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / repeat)
    del g
    return statistics.median(times)


def host_us(fn, calls: int = HOST_CALLS, rounds: int = 3) -> float:
    """Microseconds of host time per call of ``fn`` run un-graphed: ``calls`` back-to-back calls
    issued with no synchronisation in between (the GPU queue absorbs them), best of ``rounds``."""
    torch.cuda.synchronize()
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
        torch.cuda.synchronize()
    return best * 1e6


def agreed(key: measured.Key, group_name: str, *, fresh: bool = False, may_measure: bool = True) -> tuple:
    """``measured.agreed_times`` of ``key`` with this module's candidates, measuring what every rank
    lacks with ``measure_key`` (``may_measure=False``: look up only); a collective."""
    fn = (lambda only=None: measure_key(key, group_name, only)) if may_measure else None
    return measured.agreed_times(key, group_name, candidates(key.op), fn, fresh=fresh)


def measure_key(key: measured.Key, group_name: str, only: list | None = None) -> dict:
    """``{impl: us}`` on this rank (inf: failed, wrong or fell back) for every candidate of
    ``key.op``, or for ``only`` those (the ones a shipped entry lacks); a collective."""
    from tdcompile.ops import cuda as opc

    t0 = time.perf_counter()
    counted = dict(opc.RAN_IMPL)    # measuring is not running: RAN_IMPL is restored at the end
    try:
        return _measure_key(key, group_name, only, t0)
    finally:
        opc.RAN_IMPL.clear()
        opc.RAN_IMPL.update(counted)


def _measure_key(key: measured.Key, group_name: str, only, t0: float) -> dict:
    import torch.distributed as dist
    from tdcompile.ops import cuda as opc

    rank = dist.get_rank(measured._group(group_name))
    names = candidates(key.op) if only is None else only
    H = measured.HOST
    impls = list(dict.fromkeys(c[len(H):] if c.startswith(H) else c for c in names))
    try:                                   # e.g. out of memory: then no rank measures (none waits)
        args, why = _inputs(key, rank), ""
    except Exception as e:  # noqa: BLE001
        args, why = None, f"{type(e).__name__}: {str(e)[:200]}"
    if not measured.all_agree(args is not None, group_name):
        log.warning("tdist: %s: not measured (%s); unfused is kept", key.id(), why or "inputs failed on another rank")
        return {c: math.inf for c in names}
    expected = _call(key, "unfused", args, group_name)
    times = {}
    for c in impls:
        ok, why = True, ""
        try:
            before = opc.RAN[(key.op, family(c))]
            for _ in range(3):     # the first launch, a second (eager), a third replayed (ops/op_graphs.py:
                out = None         # the output's memory is reused, as in a model's steady state)
                out = _call(key, c, args, group_name)
            torch.cuda.synchronize()
            opc.check_errors(sync=False)
            if key.op != "gemm" and opc.RAN[(key.op, family(c))] < before + 3:
                ok, why = False, "fell back to unfused"
            elif not _close(out, expected):
                ok, why = False, "result differs from unfused"
        except Exception as e:  # noqa: BLE001  (a candidate that cannot run is not chosen)
            ok, why = False, f"{type(e).__name__}: {str(e)[:200]}"
        if not measured.all_agree(ok, group_name):
            times.update({n: math.inf for n in (c, H + c) if n in names})
            log.warning("tdist: %s: candidate %s not timed (%s)", key.id(), c, why or "failed on another rank")
            continue
        if c in names:
            times[c] = graph_us(lambda: _call(key, c, args, group_name))
        if H + c in names:
            times[H + c] = host_us(lambda: _call(key, c, args, group_name))
    log.info("tdist: measured %s in %.1f s: %s", key.id(), time.perf_counter() - t0,
             {c: round(t, 1) for c, t in times.items()})
    return times
