"""GEMM + reduce-scatter with cuBLAS doing the math and the copy engine pushing the partials
(``gemm_reduce_scatter`` variant ``ce``).

The ``fused`` variant is a persistent Triton GEMM that stores tiles into peers' buffers
(0.57-0.9x cuBLAS; 957 vs 816 us unfused at M=4096 down_proj, 2xH100).  Here, with
m = M / W rows per destination::

    main:  mm(a[d1 rows]) -> stage[1] ─ ev1 ─ mm(a[d2 rows]) -> stage[2] ─ ev2 ... ─ mm(a[own rows]) -> recv[own]
           ─ join ─ PUSHED barrier ─ add: out = sum over q of recv[q] (fp32, rank order)
    side:  PREV barrier ─ wait ev1 ─ CE push stage[1] -> d1's recv[rank] ─ wait ev2 ─ push ...

(d_i = (rank + i) % W: every rank pushes to a different peer at each step.)  The partials bound
for peers are computed first, so each push hides behind the GEMMs after it; the own partial
goes straight into this rank's receive slot (zero copy).  Exposed: the PUSHED barrier and the
add (reads W x m x N, writes m x N).  SMs: cuBLAS, two 1-CTA barriers, the add.

**Ordering and buffer reuse.**  Symmetric region ``gemm_reduce_scatter.ce`` = W slots of m x N;
slot q of rank d's buffer receives rank q's partial of d's rows.  PREV (pad channel 6, the op's
epoch) runs on the side stream after it joined the main stream, so a rank arrives only after
its previous call's add; a push into a peer's buffer waits for PREV, i.e. for every peer to have
consumed the previous call's partials.  PUSHED (channel 7) runs on the main stream after it
joined the side stream (this rank's pushes done); after it, every partial of this rank's rows
is in place.  The own slot is written and read only by this rank, in main-stream order.  The
epoch (``gemm_reduce_scatter``, shared with the ``fused`` variant, which only needs it to
grow) is bumped on the main stream; both barriers read it before the call returns (join).
Every wait is bounded and recorded as op ``gemm_reduce_scatter``, this rank.  Bias: added to
every rank's partial, as the reference does (``ops.reference.gemm_reduce_scatter``).
"""
from __future__ import annotations

import torch
import triton

from tdcompile.kernels import signals as sig
from tdcompile.kernels.all_gather_gemm import _ag_barrier
from tdcompile.kernels.gemm_all_reduce_ce import ADD_BLOCK, _ce_add
from tdcompile.kernels.symm import MAX_WORLD, OPS, PAD_SLOTS, Workspace, _Unsupported, phased
from tdcompile.kernels.tiles import preload, unsupported_gemm_reason

OP_ID = OPS.index("gemm_reduce_scatter")
PREV_CHANNEL, PUSHED_CHANNEL = 6, 7          # pad channels (symm.PAD_CHANNELS)
REGION = "gemm_reduce_scatter.ce"


def unsupported_reason(ws: Workspace, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    reason = unsupported_gemm_reason(ws, a, [b], bias, a.shape[0] if a.dim() == 2 else 0)
    if reason:
        return reason
    if a.shape[0] % ws.world:
        return f"M={a.shape[0]} is not a multiple of the world size {ws.world}"
    if b.shape[1] % 8:      # 16-B rows: one add-kernel specialisation, 128-bit accesses
        return f"N={b.shape[1]} is not a multiple of 8"
    return None


def _gemm(a, b, bias, out):
    return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)


@phased
def gemm_reduce_scatter_ce(ws: Workspace, a: torch.Tensor, b: torch.Tensor,
                           bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``reduce_scatter(a @ b + bias)`` over the rows: this rank's [M/W, N] block of the sum of
    every rank's ``a @ b + bias`` (module docstring); on the current stream, into ``out``
    (contiguous [M/W, N]) if given."""
    ws.check()
    reason = unsupported_reason(ws, a, b, bias)
    if reason:
        raise _Unsupported(reason)
    W, r = ws.world, ws.rank
    (M, _), N = a.shape, b.shape[1]
    m = M // W
    dt, esz = a.dtype, a.element_size()
    slot = m * N                                                           # N % 8 == 0: 16-B aligned slots
    reg = ws.region(REGION, ws.max_m * max(N, 8192) * esz)                 # >= W * slot; rarely regrown
    recv = [t[: W * slot * esz].view(dt).view(W, slot) for t in reg.peers]  # [W, m*N] per rank
    stage = torch.empty((max(W - 1, 1), m, N), dtype=dt, device=a.device)  # partials bound for peers
    out = torch.empty((m, N), dtype=dt, device=a.device) if out is None else out
    pad_stride = PAD_SLOTS * MAX_WORLD
    epoch = ws.bump_epoch("gemm_reduce_scatter")
    prev = (ws.pads.ptrs, PREV_CHANNEL * pad_stride, epoch, ws.err_addr, sig.error_code(OP_ID, r, sig.WHAT_BARRIER),
            r, ws.timeout_us)
    pushed = (ws.pads.ptrs, PUSHED_CHANNEL * pad_stride, epoch, ws.err_addr,
              sig.error_code(OP_ID, r, sig.WHAT_EXIT_BARRIER), r, ws.timeout_us)
    preload(_ag_barrier, (1,), *prev, WORLD=W, num_warps=1)
    add_kw = dict(WORLD=W, EVEN=True, BLOCK=ADD_BLOCK, num_warps=8)
    preload(_ce_add, (1,), recv[r], out, out, 1, slot // 8, **add_kw)
    main = torch.cuda.current_stream()
    ws.side.wait_stream(main)          # the previous call's add is done before this rank enters PREV
    done = []
    for i in range(1, W):              # the peers' partials first, before any rank launches a waiting kernel
        d = (r + i) % W
        _gemm(a[d * m:(d + 1) * m], b, bias, stage[i - 1])                 # [m, N]
        ev = torch.cuda.Event()
        ev.record(main)
        done.append((d, ev))
    _gemm(a[r * m:(r + 1) * m], b, bias, recv[r][r].view(m, N))            # own partial into own slot
    yield
    # Simulated ranks step one ``yield`` at a time: every rank launches its barrier before any
    # rank enqueues a push (SimWorld.run's rule for waiting kernels).
    with torch.cuda.stream(ws.side):
        _ag_barrier[(1,)](*prev, WORLD=W, num_warps=1)
    yield
    with torch.cuda.stream(ws.side):
        for i, (d, ev) in enumerate(done):
            ws.side.wait_event(ev)
            recv[d][r].view(m, N).copy_(stage[i])                          # [m, N] into d's slot r (CE)
    yield
    main.wait_stream(ws.side)
    _ag_barrier[(1,)](*pushed, WORLD=W, num_warps=1)
    if slot:
        _ce_add[(triton.cdiv(slot, ADD_BLOCK),)](recv[r], out, out, slot // 8, slot // 8, **add_kw)
    return out
