"""All-gather + GEMM(s) with cuBLAS doing the math and the copy engine moving the shards
(``all_gather_gemm`` variant ``ce``).

The ``fused`` variant computes with a persistent Triton GEMM that waits on per-shard flags;
that GEMM runs at 0.57-0.9x cuBLAS, so the fused op lost to NCCL + cuBLAS at prefill sizes
(issue 11: 1938 vs 1710 us at M=4096 gate/up, 2xH100).  Here every FLOP is cuBLAS's, and the
only SM work besides it is two 1-CTA barriers::

    main:  mm(a_shard, b_j) -> own rows ─ wait ENTRY ─ pull s2 ─ mm(s2 rows) ─ ... ─ join ─ EXIT barrier
    side:  copy-in ─ ENTRY barrier ───── pull s1 ─ mm(s1 rows) ─ pull s3 ─ mm(s3 rows) ...

(s_i = (rank + i) % W: every rank pulls from a different peer at each step.)  The own shard's
GEMMs start at once; pull i hides behind the GEMMs before it.  Shards alternate between the two
streams, so one GEMM's last wave overlaps the next one's first (torch async-TP's schedule; with
the GEMMs of one stream only this variant measured 383 vs 335 us for torch's at M=4096 q/k/v,
2xH200, calibrate-h200-tp2-20261127-1255-sp.json).  What stays exposed: the first pull when the
own-shard GEMM is shorter than copy-in + barrier + pull (small M, W=4), and the EXIT barrier.

**Ordering and buffer reuse.**  The shard buffer is the symmetric region
``all_gather_gemm.shard`` and the barriers are the ENTRY / EXIT channels with the op's epoch,
shared with the ``fused`` variant (same protocol: copy-in before ENTRY, pulls between ENTRY and
EXIT), so calls of both may interleave.  ENTRY follows this rank's copy-in on the side stream:
after it every peer's shard is in place.  EXIT follows this rank's pulls: after it no peer reads
our shard any more, so the next call's copy-in (later on the same side stream) may overwrite it.
The main stream joins the side stream before returning (graph-capturable fork/join), so the
epoch is bumped for the next call only after this call's barriers read it.  Every wait is
bounded (``TDCOMPILE_SPIN_TIMEOUT_S``) and recorded as op ``all_gather_gemm``, this rank.
Testable on one GPU with simulated ranks (their D2D copies then run as kernels).
"""
from __future__ import annotations

import torch
import triton

from tdcompile.kernels import signals as sig
from tdcompile.kernels.all_gather_gemm import ENTRY_CHANNEL, EXIT_CHANNEL, OP_ID, _ag_barrier
from tdcompile.kernels.symm import MAX_WORLD, PAD_SLOTS, Workspace, _Unsupported, phased
from tdcompile.kernels.tiles import preload, unsupported_gemm_reason

REGION = "all_gather_gemm.shard"       # the ``fused`` variant's shard buffer


def unsupported_reason(ws: Workspace, a: torch.Tensor, bs) -> str | None:
    return unsupported_gemm_reason(ws, a, list(bs), None, a.shape[0] * ws.world if a.dim() == 2 else 0)


@phased
def all_gather_gemm_ce(ws: Workspace, a_shard: torch.Tensor, bs: list, return_a: bool = False,
                       out: tuple | None = None):
    """``(A if return_a else empty, [A @ b for b in bs])`` with A the row-concatenation of every
    rank's ``a_shard`` ([m, K] each, A [W*m, K]); on the current stream (module docstring).
    ``out``: ``(A or None, [outputs])`` to write into (contiguous, allocated by the caller)."""
    ws.check()
    reason = unsupported_reason(ws, a_shard, bs)
    if reason:
        raise _Unsupported(reason)
    W, r = ws.world, ws.rank
    m, K = a_shard.shape
    M = W * m
    dt, esz = a_shard.dtype, a_shard.element_size()
    shard = ws.region(REGION, triton.cdiv(ws.max_m, W) * K * esz)
    peers = [t[: m * K * esz].view(dt).view(m, K) for t in shard.peers]      # [m, K] per rank
    a_shard = a_shard.contiguous()
    A, outs = out if out is not None else (None, None)
    if A is None:
        A = torch.empty((M, K), dtype=dt, device=a_shard.device)             # gathered rows
    if outs is None:
        outs = [torch.empty((M, b.shape[1]), dtype=dt, device=a_shard.device) for b in bs]
    pad_stride = PAD_SLOTS * MAX_WORLD
    epoch = ws.bump_epoch("all_gather_gemm")
    entry = (ws.pads.ptrs, ENTRY_CHANNEL * pad_stride, epoch, ws.err_addr, sig.error_code(OP_ID, r, sig.WHAT_BARRIER),
             r, ws.timeout_us)
    leave = (ws.pads.ptrs, EXIT_CHANNEL * pad_stride, epoch, ws.err_addr,
             sig.error_code(OP_ID, r, sig.WHAT_EXIT_BARRIER), r, ws.timeout_us)
    preload(_ag_barrier, (1,), *entry, WORLD=W, num_warps=1)
    main = torch.cuda.current_stream()
    ws.side.wait_stream(main)          # a_shard written, epoch bumped, the previous call joined
    with torch.cuda.stream(ws.side):
        peers[r].copy_(a_shard)                                              # [m, K] copy-in
        if return_a:
            A[r * m:(r + 1) * m].copy_(a_shard)
    for b, c in zip(bs, outs):   # own rows, no wait; first, before any rank launches a waiting kernel
        torch.mm(a_shard, b, out=c[r * m:(r + 1) * m])                      # (cuBLAS may allocate)
    yield
    # Simulated ranks step one ``yield`` at a time: every rank launches its barrier before any
    # rank enqueues a pull (SimWorld.run's rule for waiting kernels).
    entered = torch.cuda.Event()
    with torch.cuda.stream(ws.side):
        _ag_barrier[(1,)](*entry, WORLD=W, num_warps=1)
        entered.record(ws.side)
    yield
    main.wait_event(entered)
    for i in range(1, W):        # pull + GEMMs of shard s_i on alternating streams: a GEMM's last
        s = (r + i) % W          # wave overlaps the next one's first (torch async-TP's schedule)
        with torch.cuda.stream(ws.side if i % 2 else main):
            A[s * m:(s + 1) * m].copy_(peers[s])                             # [m, K] over NVLink (CE)
            for b, c in zip(bs, outs):
                torch.mm(A[s * m:(s + 1) * m], b, out=c[s * m:(s + 1) * m])  # shard s's rows
    yield
    main.wait_stream(ws.side)
    _ag_barrier[(1,)](*leave, WORLD=W, num_warps=1)     # after every pull: peers may reuse their buffer
    return (A if return_a else A.new_empty(0)), outs
