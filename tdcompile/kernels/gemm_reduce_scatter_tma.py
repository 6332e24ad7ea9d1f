"""GEMM + reduce-scatter on ONE persistent TMA GEMM, partials pushed by the copy engine as
each destination's rows complete (``gemm_reduce_scatter`` variant ``tma``).

``ce`` (``kernels/gemm_reduce_scatter_ce.py``) runs one cuBLAS GEMM per destination: at W=4,
M=4096 each is 1024 rows, ~1.2 waves of 128x256 tiles on 132 SMs, so every launch ends on a
mostly idle wave.  Here one launch walks all W x tiles (peers' rows first, rank + 1 onwards,
its own rows last), so only the last wave of the whole op is ragged; the A/B operands move by
TMA as in ``kernels/gemm_tma.py``.  With m = M / W rows per destination::

    main:  cnt = 0 ─ GEMM on SMs - 1: tiles of d1's rows -> stage[0] (cnt[0] += 1 per tile),
           d2's rows -> stage[1], ..., own rows -> recv[own] ─ join ─ PUSHED barrier ─ add
    side:  PREV barrier ─ wait cnt[0] = tiles ─ CE push stage[0] -> d1's recv[rank] ─ wait cnt[1] ─ push ...

(d_i = (rank + 1 + i) % W.)  The side stream's barrier and waits are 1-CTA kernels on the SM
the GEMM leaves free.  Tiles are stored with plain stores (a TMA store's completion is not a
visibility point for the copy engine); per tile: ``fence.acq_rel.sys`` by every thread,
``bar.sync``, one ``atom.add.release.sys`` on the destination's counter; the wait is an
``ld.acquire.sys`` spin (``signals.wait_geq``).  Counters are zeroed on the main stream before
the side stream forks from it, so a wait never sees the previous call's count.

Same receive region, barriers (PREV / PUSHED) and epoch as ``ce``, so calls of both may
interleave; the add is ``ce``'s (fp32, rank order).  Every wait is bounded and recorded as op
``gemm_reduce_scatter``, this rank.  No bias (the Qwen3 projections have none).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from tdcompile.kernels import signals as sig
from tdcompile.kernels.all_gather_gemm import _ag_barrier
from tdcompile.kernels.gemm_all_reduce_ce import ADD_BLOCK, _ce_add
from tdcompile.kernels.gemm_reduce_scatter_ce import OP_ID, PREV_CHANNEL, PUSHED_CHANNEL, REGION
from tdcompile.kernels.gemm_reduce_scatter_ce import unsupported_reason as ce_reason
from tdcompile.kernels.gemm_tma import b_layout, pick_tma_config, tma_tile
from tdcompile.kernels.gemm_tma import preload as preload_desc
from tdcompile.kernels.gemm_tma import unsupported_reason as tma_reason
from tdcompile.kernels.signals import fence_sys, record_error, wait_geq
from tdcompile.kernels.symm import MAX_WORLD, PAD_SLOTS, Workspace, _Unsupported, phased
from tdcompile.kernels.tiles import num_sms, preload, swizzle


@triton.jit(do_not_specialize=["m_seg", "rank"])
def _rs_tma_gemm(a_desc, b_desc, stage_ptr, own_ptr, cnt_ptr, m_seg, N, K, rank, WORLD: tl.constexpr,
                 B_KN: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
                 BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr, FLATTEN: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    num_pid_m = tl.cdiv(m_seg, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    tps = num_pid_m * num_pid_n                        # tiles per destination
    for t in tl.range(pid, WORLD * tps, G, flatten=FLATTEN):   # no waits inside: the pipeline may span tiles
        i = t // tps                                   # destination index: peers 0..W-2, own W-1
        d = (rank + 1 + i) % WORLD
        pid_m, pid_n = swizzle(t % tps, num_pid_m, num_pid_n, GROUP_SIZE_M)
        row0 = d * m_seg + pid_m * BLOCK_SIZE_M        # may run past d's rows: masked below
        col0 = pid_n * BLOCK_SIZE_N
        acc = tma_tile(a_desc, b_desc, row0, col0, K, B_KN, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K)
        lrows = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)       # rows of d's segment
        cols = col0 + tl.arange(0, BLOCK_SIZE_N)
        mask = (lrows < m_seg)[:, None] & (cols < N)[None, :]
        base = tl.where(i < WORLD - 1, stage_ptr + i.to(tl.int64) * m_seg * N, own_ptr)
        tl.store(base + lrows[:, None].to(tl.int64) * N + cols[None, :], acc.to(stage_ptr.dtype.element_ty),
                 mask=mask)
        if i < WORLD - 1:                              # publish: this tile of d's partial is in stage[i]
            fence_sys()
            tl.debug_barrier()
            tl.atomic_add(cnt_ptr + i, 1, sem="release", scope="sys")


@triton.jit(do_not_specialize=["idx", "target", "err_code", "timeout_us"])
def _rs_wait(cnt_ptr, idx, target, err_addr, err_code, timeout_us):
    """Until ``cnt[idx] >= target`` (every tile of one destination stored), bounded."""
    ok = wait_geq(cnt_ptr + idx, target, timeout_us.to(tl.int64) * 1000)
    if ok == 0:
        record_error(err_addr, err_code)


_COUNTERS: dict = {}


def _counters(ws: Workspace) -> torch.Tensor:
    """This workspace's per-destination tile counters (int32, local memory, reused every call)."""
    key = id(ws)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(MAX_WORLD, dtype=torch.int32, device=ws.device)
    return _COUNTERS[key]


def unsupported_reason(ws: Workspace, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    reason = ce_reason(ws, a, b, bias)
    if reason:
        return reason
    if bias is not None:
        return "bias (the TMA GEMM + reduce-scatter takes none)"
    reason = tma_reason(a, b)
    return f"TMA GEMM: {reason}" if reason else None


@phased
def gemm_reduce_scatter_tma(ws: Workspace, a: torch.Tensor, b: torch.Tensor,
                            bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``reduce_scatter(a @ b)`` over the rows: this rank's [M/W, N] block of the sum of every
    rank's ``a @ b`` (module docstring); on the current stream, into ``out`` (contiguous
    [M/W, N]) if given."""
    ws.check()
    reason = unsupported_reason(ws, a, b, bias)
    if reason:
        raise _Unsupported(reason)
    W, r = ws.world, ws.rank
    (M, K), N = a.shape, b.shape[1]
    m = M // W
    dt, esz = a.dtype, a.element_size()
    slot = m * N
    reg = ws.region(REGION, ws.max_m * max(N, 8192) * esz)                 # shared with ``ce``
    recv = [t[: W * slot * esz].view(dt).view(W, slot) for t in reg.peers]  # [W, m*N] per rank
    stage = torch.empty((max(W - 1, 1), m, N), dtype=dt, device=a.device)  # partials bound for peers
    out = torch.empty((m, N), dtype=dt, device=a.device) if out is None else out
    cnt = _counters(ws)
    cfg = pick_tma_config(M, N, K)
    bm, b_kn = b_layout(b)
    BM, BN, BK = cfg.BLOCK_SIZE_M, cfg.BLOCK_SIZE_N, cfg.BLOCK_SIZE_K
    a_desc = TensorDescriptor.from_tensor(a, [BM, BK])
    b_desc = TensorDescriptor.from_tensor(bm, [BK, BN] if b_kn else [BN, BK])
    tps = triton.cdiv(m, BM) * triton.cdiv(N, BN)
    # one SM stays free for the side stream's barrier and waits (two more per simulated rank:
    # there the pushes are same-device copies, which run as kernels)
    sms = num_sms() // W - 2 if ws.sim is not None else num_sms() - 1
    grid = (max(1, min(sms, W * tps)),)
    gemm_args = (a_desc, b_desc, stage, recv[r][r].view(m, N), cnt, m, N, K, r)
    gemm_kw = dict(WORLD=W, B_KN=b_kn, BLOCK_SIZE_M=BM, BLOCK_SIZE_N=BN, BLOCK_SIZE_K=BK,
                   GROUP_SIZE_M=cfg.GROUP_SIZE_M, FLATTEN=cfg.FLATTEN, num_warps=cfg.num_warps,
                   num_stages=cfg.num_stages)
    pad_stride = PAD_SLOTS * MAX_WORLD
    epoch = ws.bump_epoch("gemm_reduce_scatter")
    prev = (ws.pads.ptrs, PREV_CHANNEL * pad_stride, epoch, ws.err_addr, sig.error_code(OP_ID, r, sig.WHAT_BARRIER),
            r, ws.timeout_us)
    pushed = (ws.pads.ptrs, PUSHED_CHANNEL * pad_stride, epoch, ws.err_addr,
              sig.error_code(OP_ID, r, sig.WHAT_EXIT_BARRIER), r, ws.timeout_us)
    wait_code = sig.error_code(OP_ID, r, sig.WHAT_TILE_FLAG)
    add_kw = dict(WORLD=W, EVEN=True, BLOCK=ADD_BLOCK, num_warps=8)
    preload_desc(_rs_tma_gemm, grid, *gemm_args, **gemm_kw)
    preload(_ag_barrier, (1,), *prev, WORLD=W, num_warps=1)
    preload(_rs_wait, (1,), cnt, 0, tps, ws.err_addr, wait_code, ws.timeout_us, num_warps=1)
    preload(_ce_add, (1,), recv[r], out, out, 1, slot // 8, **add_kw)
    main = torch.cuda.current_stream()
    cnt.zero_()
    ws.side.wait_stream(main)          # counters zeroed and the previous call's add done before the side waits
    _rs_tma_gemm[grid](*gemm_args, **gemm_kw)
    yield
    with torch.cuda.stream(ws.side):
        _ag_barrier[(1,)](*prev, WORLD=W, num_warps=1)
    yield
    with torch.cuda.stream(ws.side):
        for i in range(W - 1):
            d = (r + 1 + i) % W
            _rs_wait[(1,)](cnt, i, tps, ws.err_addr, wait_code, ws.timeout_us, num_warps=1)
            recv[d][r].view(m, N).copy_(stage[i])                          # [m, N] into d's slot r (CE)
    yield
    main.wait_stream(ws.side)
    _ag_barrier[(1,)](*pushed, WORLD=W, num_warps=1)
    if slot:
        _ce_add[(triton.cdiv(slot, ADD_BLOCK),)](recv[r], out, out, slot // 8, slot // 8, **add_kw)
    return out
