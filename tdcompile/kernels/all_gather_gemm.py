"""All-gather + GEMM(s): peer shards are pulled by the copy engine on a side stream (no
SMs), each followed by a per-shard flag write (``cuStreamWriteValue32``; ``cuMemsetD32``
under CUDA-graph capture).  A persistent Triton GEMM per weight starts with the local shard
and waits on each remote shard's flag before its first tile of that shard.

Per call: epoch += 1; flags zeroed; own shard -> own symmetric buffer and into A (CE);
entry barrier (every peer's shard is in place); side stream: pull peers (rank+1, ...) +
flags; main stream: the GEMMs; join; exit barrier (no peer pulls from our buffer any more,
so the next call may overwrite it).  The gathered A is an ordinary tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tdcompile.kernels import signals as sig
from tdcompile.kernels.signals import block_barrier, record_error, wait_geq
from tdcompile.kernels.symm import MAX_WORLD, OPS, PAD_SLOTS, Workspace, _Unsupported, phased
from tdcompile.kernels.tiles import col_offsets, mm_tile, num_sms, pick_config, preload, swizzle, unsupported_gemm_reason

OP_ID = OPS.index("all_gather_gemm")
ENTRY_CHANNEL, EXIT_CHANNEL = 2, 3


@triton.jit(do_not_specialize=["rank", "err_code", "timeout_us"])
def _ag_barrier(pad_tab, pad_off, epoch_ptr, err_addr, err_code, rank, timeout_us, WORLD: tl.constexpr):
    epoch = tl.load(epoch_ptr)
    ok = block_barrier(pad_tab, pad_off, 0, rank, epoch, timeout_us.to(tl.int64) * 1000, WORLD)
    if ok == 0:
        record_error(err_addr, err_code)


@triton.jit(do_not_specialize=["m_seg", "rank", "err_code", "timeout_us"])
def _ag_gemm_kernel(a_ptr, b_ptr, c_ptr, progress_ptr, m_seg, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                    stride_cm, err_addr, err_code, rank, timeout_us, WORLD: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
                    GROUP_SIZE_M: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    tmo = timeout_us.to(tl.int64) * 1000
    num_pid_m = tl.cdiv(m_seg, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    tps = num_pid_m * num_pid_n
    ok = tl.full((), 1, tl.int32)
    for t in range(pid, WORLD * tps, G):
        i = t // tps
        s = (rank + i) % WORLD                           # own shard first, then pull order
        if i != 0:
            ok = ok & wait_geq(progress_ptr + s, 1, tmo * ok)
            tl.debug_barrier()
        if ok != 0:
            pid_m, pid_n = swizzle(t % tps, num_pid_m, num_pid_n, GROUP_SIZE_M)
            lrows = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
            cols = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
            ccols = col_offsets(pid_n, N, BLOCK_SIZE_N, EVEN_N)
            grows = s * m_seg + tl.where(lrows < m_seg, lrows, 0)
            acc = mm_tile(a_ptr, b_ptr, grows, ccols, K, stride_am, stride_ak, stride_bk,
                          stride_bn, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, EVEN_K)
            mask = (lrows < m_seg)[:, None] & (cols < N)[None, :]
            orow = s * m_seg + lrows
            tl.store(c_ptr + orow[:, None].to(tl.int64) * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                     mask=mask)
    if ok == 0:
        record_error(err_addr, err_code)


import os as _os
import time as _time

_DEBUG = _os.environ.get("TDCOMPILE_DEBUG_HOST") == "1"


def _dbg(ws, what, t0=[0.0]):
    if _DEBUG:
        now = _time.perf_counter()
        print(f"[ag r{ws.rank}] {what:28s} +{(now - t0[0]) * 1e3:8.2f} ms  err={int(ws.err[0])}", flush=True)
        t0[0] = now


def _write_flag(flags_u32: torch.Tensor, idx: int, val: int) -> None:
    """Copy-engine flag write on the current stream (no SMs)."""
    from torch._C._distributed_c10d import _SymmetricMemory
    if torch.cuda.is_current_stream_capturing():
        _SymmetricMemory.memset32(flags_u32, idx, val, 1)
    else:
        _SymmetricMemory.stream_write_value32(flags_u32, idx, val)


def unsupported_reason(ws: Workspace, a: torch.Tensor, bs) -> str | None:
    return unsupported_gemm_reason(ws, a, list(bs), None, a.shape[0] * ws.world if a.dim() == 2 else 0)


@phased
def all_gather_gemm(ws: Workspace, a_shard: torch.Tensor, bs: list, return_a: bool = False, out_a=None, outs=None):
    """``(A if return_a else empty, [A @ b for b in bs])`` with A the row-concatenation of
    every rank's ``a_shard``; launched on the current stream.  ``out_a``/``outs``:
    optional preallocated outputs (contiguous)."""
    ws.check()
    reason = unsupported_reason(ws, a_shard, bs)
    if reason:
        raise _Unsupported(reason)
    W, r = ws.world, ws.rank
    m, K = a_shard.shape
    M = W * m
    esz = a_shard.element_size()
    shard = ws.region("all_gather_gemm.shard", triton.cdiv(ws.max_m, W) * K * esz)
    A = torch.empty((M, K), dtype=a_shard.dtype, device=a_shard.device) if out_a is None else out_a
    if outs is None:
        outs = [torch.empty((M, b.shape[1]), dtype=a_shard.dtype, device=a_shard.device) for b in bs]
    pad_stride = PAD_SLOTS * MAX_WORLD
    cur = torch.cuda.current_stream()
    # Leave SMs free for work the GEMM waits on that may need them: same-device copies in
    # simulation (D2D memcpy within one GPU runs as a kernel) and memset nodes in graphs.
    reserve = 4 if ws.sim is not None else (2 if torch.cuda.is_current_stream_capturing() else 0)
    sms = num_sms() // (W if ws.sim is not None else 1) - reserve
    launches = []
    for b, c in zip(bs, outs):
        N = b.shape[1]
        cfg = pick_config(M, N, K)
        tps = triton.cdiv(m, cfg.BLOCK_SIZE_M) * triton.cdiv(N, cfg.BLOCK_SIZE_N)
        args = (A, b, c, ws.progress, m, N, K, A.stride(0), A.stride(1), b.stride(0), b.stride(1), c.stride(0),
                ws.err_addr, sig.error_code(OP_ID, r, sig.WHAT_SHARD_FLAG), r, ws.timeout_us)
        kw = dict(WORLD=W, EVEN_K=K % cfg.BLOCK_SIZE_K == 0, EVEN_N=N % cfg.BLOCK_SIZE_N == 0,
                  BLOCK_SIZE_M=cfg.BLOCK_SIZE_M, BLOCK_SIZE_N=cfg.BLOCK_SIZE_N, BLOCK_SIZE_K=cfg.BLOCK_SIZE_K,
                  GROUP_SIZE_M=cfg.GROUP_SIZE_M, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        grid = (max(1, min(sms, W * tps)),)
        preload(_ag_gemm_kernel, grid, *args, **kw)
        launches.append((grid, args, kw))
    code = sig.error_code(OP_ID, r, sig.WHAT_BARRIER)
    epoch = ws.bump_epoch("all_gather_gemm")
    preload(_ag_barrier, (1,), ws.pads.ptrs, ENTRY_CHANNEL * pad_stride, epoch, ws.err_addr, code, r, ws.timeout_us,
            WORLD=W, num_warps=1)
    _dbg(ws, "preloaded")
    ws.progress.zero_()
    shard.local[: m * K * esz].view(a_shard.dtype).view(m, K).copy_(a_shard)
    A[r * m:(r + 1) * m].copy_(a_shard)
    yield
    _ag_barrier[(1,)](ws.pads.ptrs, ENTRY_CHANNEL * pad_stride, epoch, ws.err_addr, code, r, ws.timeout_us,
                      WORLD=W, num_warps=1)
    _dbg(ws, "entry barrier launched")
    ws.side.wait_stream(cur)
    flags_u32 = ws.progress.view(torch.uint32)
    yield
    with torch.cuda.stream(ws.side):
        for i in range(1, W):
            s = (r + i) % W
            A[s * m:(s + 1) * m].copy_(shard.peers[s][: m * K * esz].view(a_shard.dtype).view(m, K))
            _dbg(ws, f"pull {s} enqueued")
            _write_flag(flags_u32, s, 1)
            _dbg(ws, f"flag {s} enqueued")
    yield
    for grid, args, kw in launches:
        _ag_gemm_kernel[grid](*args, **kw)
    _dbg(ws, "gemms launched")
    cur.wait_stream(ws.side)
    # exit barrier (WAR on our shard buffer) after the GEMMs on the main stream: it never
    # competes with the persistent GEMM for SMs
    _ag_barrier[(1,)](ws.pads.ptrs, EXIT_CHANNEL * pad_stride, epoch, ws.err_addr,
                      sig.error_code(OP_ID, r, sig.WHAT_EXIT_BARRIER), r, ws.timeout_us, WORLD=W, num_warps=1)
    _dbg(ws, "exit barrier launched")
    return (A if return_a else A.new_empty(0)), outs


def local_gemm(a: torch.Tensor, b: torch.Tensor, grid_sms: int | None = None) -> torch.Tensor:
    """The same persistent Triton GEMM with no communication (the overlap ceiling)."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    cfg = pick_config(M, N, K)
    tiles = triton.cdiv(M, cfg.BLOCK_SIZE_M) * triton.cdiv(N, cfg.BLOCK_SIZE_N)
    sms = grid_sms or num_sms()
    _ag_gemm_kernel[(max(1, min(sms, tiles)),)](
        a, b, c, a, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), 1 << 40, 0, 0, 1,
        WORLD=1, EVEN_K=K % cfg.BLOCK_SIZE_K == 0, EVEN_N=N % cfg.BLOCK_SIZE_N == 0, BLOCK_SIZE_M=cfg.BLOCK_SIZE_M, BLOCK_SIZE_N=cfg.BLOCK_SIZE_N,
        BLOCK_SIZE_K=cfg.BLOCK_SIZE_K, GROUP_SIZE_M=cfg.GROUP_SIZE_M, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return c
