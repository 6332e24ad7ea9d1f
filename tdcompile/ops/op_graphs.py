"""Un-graphed calls of a fused op, replayed as one CUDA graph per call site (host time).

A fused op issues 1-30 launches, stream switches and events from Python: on the H200 hosts
that is 190-1000 us per call against 10-400 us on the device (``scripts/host_profile.py``,
``benchmarks/results/host-profile-h200-w*.json``), so an un-graphed model became CPU-bound
and ``auto`` had to keep such ops unfused.  Here the second call with the same addresses
captures the op body once into a CUDA graph, and later calls replay it::

    call 1 (new addresses)    body()                       eager, the addresses are remembered
    call 2 (same addresses)   capture body() -> graph g    g.replay()
    call 3, 4, ...            g.replay()                   one launch from the host

**What a graph bakes in, and why a replay is still right.**  The key holds the op, impl and
input signature, every input and output tensor's address and strides, the scalar arguments
(eps) and the workspace ``generation``:

* inputs and outputs: the caller allocates the outputs before the lookup (``ops.cuda``), so a
  hit means the graph reads and writes exactly the tensors of this call;
* symmetric regions, pads, epochs, error word: static per workspace; a region that grows bumps
  ``Workspace.generation``, which drops every graph of that workspace;
* intermediates (gathered rows, staged partials, copies of non-contiguous inputs): allocated
  during capture from one private pool shared by all op graphs.  Replays run in stream order
  (as every call of a group's ops must: they share the symmetric buffers), and each graph
  joins its side streams before it ends, so no two graphs' intermediates are live at once;
* device state (epochs, per-block barrier counters) is advanced by the graph itself, so eager
  calls and replays interleave freely.  Impls with host-side state (the Lamport kernels'
  buffer parity) are not replayed: ``REPLAYABLE``.

Ranks need not agree: capturing runs nothing on the device and takes no collective, so a rank
that captures while its peers replay only arrives later at the device barriers (bounded waits).
The first launch of a signature stays eager (it compiles kernels and meets the peers at the
host barrier of ``ops.cuda._run``).  Inside an outer capture (Engine decode, bench graphed
rows, ``measure.graph_us``) the body is simply captured into that graph.

**Addresses that do not repeat.**  A call site replays only while its tensors keep their
addresses (a model's steady state: the caching allocator hands out the same blocks every
forward).  Where they change on every call (a caller that keeps many earlier outputs alive),
each call is a first sighting and runs eagerly -- at the eager host time, not the replayed one
that ``auto`` was charged -- and a key seen exactly twice costs a capture that is never replayed.
So a signature whose captures are not paid back stops capturing: after ``CHURN_CAPTURES``
captures with fewer later replays than captures, its calls run eagerly for good, with a warning
(``STATS["unstable"]``).  A model of up to ``CHURN_CAPTURES`` call sites per signature captures
them all in its second forward and replays them from the third on, so it never trips this.

``TDCOMPILE_OP_GRAPHS=0`` turns replays off; the measured table's host entries then no longer
match (their digest includes the setting), so they are measured again.
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Callable

import torch

log = logging.getLogger("tdcompile.ops")

REPLAYABLE = {
    "all_reduce": {"fused:one_shot", "fused:two_shot"},
    "gemm_all_reduce": {"fused:one_shot", "fused:two_shot", "fused:ce2", "fused:ce4", "fused:ce2s8", "fused:ce4s8",
                        "fused:ce4s16", "fused:chain1", "fused:chain2",
                        "fused:chain4"},
    "all_reduce_rmsnorm": {"fused:one_shot", "fused:two_shot"},
    "gemm_all_reduce_rmsnorm": {"fused:one_shot", "fused:two_shot"},
    "all_gather_gemm": {"fused:ce"},
    "gemm_reduce_scatter": {"fused:ce"},
}
"""(op -> impls) whose one-call body is safe to replay: all state they advance lives on the device."""
MAX_GRAPHS = int(os.environ.get("TDCOMPILE_OP_GRAPHS_MAX", "1024"))
"""Captured graphs kept (least recently replayed dropped first): one per op call site of a model."""
CHURN_CAPTURES = 256
"""Captures of one signature (op, impl, shapes; all call sites and workspaces) after which, if its
graphs were replayed fewer times than captured, it stops capturing and runs eagerly."""
STATS: collections.Counter = collections.Counter()
"""``"replay" | "capture" | "eager" | "capture_failed" | "dropped" | "unstable"`` -> calls."""

_GRAPHS: "collections.OrderedDict[tuple, torch.cuda.CUDAGraph | None]" = collections.OrderedDict()
_SEEN: "collections.OrderedDict[tuple, None]" = collections.OrderedDict()
_GEN: dict[str, int] = {}
_PAYBACK: dict[tuple, list] = {}          # tag -> [captures, replays after capture]; None: stopped
_ERR: dict[int, tuple] = {}               # id(workspace error word) -> (the tensor, its NumPy view)
_STATE: dict = {"pool": None, "stream": None}


def enabled() -> bool:
    return os.environ.get("TDCOMPILE_OP_GRAPHS", "1") != "0"


def replayable(op: str, impl: str) -> bool:
    return enabled() and impl in REPLAYABLE.get(op, ())


def clear() -> None:
    """Drop every captured graph (their intermediates return to the shared pool)."""
    _GRAPHS.clear()
    _SEEN.clear()
    _GEN.clear()
    _PAYBACK.clear()


def empty(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def fused(op: str, impl: str, sig: tuple, inputs: tuple, alloc: Callable[[], tuple], body: Callable,
          result: Callable) -> Callable:
    """``fused(ws)`` for ``ops.cuda``: allocate the outputs (``alloc()``), run ``body(ws, outs)``
    through ``launch`` (eager, captured or replayed; inside an outer capture simply run), and
    return ``result(outs)``.  A signature's first call is a first sighting, so it runs eagerly."""
    def run(ws):
        outs = alloc()
        if replayable(op, impl) and not torch.cuda.is_current_stream_capturing():
            launch(ws, (op, impl, sig), tuple(inputs) + tuple(outs), lambda: body(ws, outs))
        else:
            body(ws, outs)
        return result(outs)
    return run


def _key(tag: tuple, ws, tensors) -> tuple:
    return (tag, ws.name, ws.generation,
            tuple([(t.data_ptr(), t.stride()) if isinstance(t, torch.Tensor) else t for t in tensors]))


def _check(ws) -> None:
    """``ws.check()`` (a recorded peer timeout raises) when there is anything to report: the
    error word is read through a NumPy view of its pinned page, ~0.1 us instead of ~1 for
    indexing the tensor on every replay."""
    err = getattr(ws, "err", None)
    if err is None or getattr(ws, "broken", False):
        return ws.check()
    view = _ERR.get(id(err))
    if view is None or view[0] is not err:
        view = _ERR[id(err)] = (err, err.numpy())
    if view[1][0]:
        ws.check()


def launch(ws, tag: tuple, tensors, body: Callable[[], object]) -> str:
    """Run ``body()`` (launches that read ``tensors`` and write the outputs among them) on the
    current stream: eagerly, by capturing it, or by replaying its graph.  Returns which.
    Non-tensor entries of ``tensors`` (eps, None) are part of the key as they are."""
    if _GEN.get(ws.name, ws.generation) != ws.generation:       # a region moved: old graphs are void
        for k in [k for k in _GRAPHS if k[1] == ws.name]:
            del _GRAPHS[k]
            STATS["dropped"] += 1
    _GEN[ws.name] = ws.generation
    key = _key(tag, ws, tensors)
    if key in _GRAPHS:
        g = _GRAPHS[key]
        if g is None:                                           # its capture failed: eager for good
            body()
            STATS["eager"] += 1
            return "eager"
        _check(ws)                                              # a recorded peer timeout raises here
        _GRAPHS.move_to_end(key)
        g.replay()
        STATS["replay"] += 1
        pay = _PAYBACK.get(tag)
        if pay is not None:
            pay[1] += 1
        return "replay"
    pay = _PAYBACK.setdefault(tag, [0, 0])
    if pay is None:                                             # its addresses never repeat: eager
        body()
        STATS["eager"] += 1
        return "eager"
    if key not in _SEEN:                                        # first sighting: remember, run eagerly
        _SEEN[key] = None
        while len(_SEEN) > 4 * MAX_GRAPHS:
            _SEEN.popitem(last=False)
        body()
        STATS["eager"] += 1
        return "eager"
    if pay[0] >= CHURN_CAPTURES and pay[1] < pay[0]:           # captures not paid back: stop capturing
        _PAYBACK[tag] = None
        STATS["unstable"] += 1
        log.warning("tdist::%s %s: call addresses keep changing (%d graphs captured, %d replays): its calls "
                    "run eagerly from now on, at the eager host time", tag[0], tag[1], pay[0], pay[1])
        body()
        STATS["eager"] += 1
        return "eager"
    pay[0] += 1
    g = _capture(tag, body)
    _GRAPHS[key] = g
    while len(_GRAPHS) > MAX_GRAPHS:
        _GRAPHS.popitem(last=False)
        STATS["dropped"] += 1
    if g is None:
        body()
        STATS["eager"] += 1
        return "eager"
    g.replay()
    STATS["capture"] += 1
    return "capture"


def _capture(tag: tuple, body: Callable[[], object]):
    """``body`` captured on a side stream into a graph of the shared pool, or None if it cannot be."""
    if _STATE["pool"] is None:
        _STATE["pool"], _STATE["stream"] = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        # a graph that lives as long as the process holds the pool: when the last op graph of a
        # pool is dropped (a grown region voids them all) torch releases the pool, and the next
        # capture into that handle fails (allocator assert "use_count > 0", 4xH200, 2026-11-27)
        cell = torch.zeros(1, device="cuda")
        anchor = torch.cuda.CUDAGraph()
        with torch.cuda.stream(_STATE["stream"]):
            anchor.capture_begin(pool=_STATE["pool"], capture_error_mode="thread_local")
            cell.add_(1)
            anchor.capture_end()
        _STATE["anchor"] = (anchor, cell)
    stream, g = _STATE["stream"], torch.cuda.CUDAGraph()
    torch.cuda.synchronize()                 # no pending frees or queries while this thread captures
    try:
        with torch.cuda.stream(stream):
            g.capture_begin(pool=_STATE["pool"], capture_error_mode="thread_local")
            try:
                body()
            finally:
                g.capture_end()
    except Exception as e:  # noqa: BLE001  (the eager path still works: never a failed call)
        STATS["capture_failed"] += 1
        log.warning("tdist::%s %s: cannot replay as a CUDA graph (%s: %s); runs eagerly",
                    tag[0], tag[1], type(e).__name__, str(e)[:200])
        torch.cuda.synchronize()
        return None
    return g
