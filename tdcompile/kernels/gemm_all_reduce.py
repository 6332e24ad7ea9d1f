"""GEMM + all-reduce: the GEMM epilogue writes each tile of ``a @ b (+ bias)`` into this
rank's symmetric staging buffer and publishes a per-tile flag (= device epoch); a reducer
kernel on a side stream (a few SMs, concurrent with the GEMM) consumes tiles as their
flags arrive on every rank, sums the W partials in fp32 in rank order and writes an
ordinary output tensor.

Staging is double-buffered by epoch parity; a rank's call e+2 GEMM can only start after
every peer finished reading call e (peer GEMM e+1 follows peer reducer e on its stream).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tdcompile.kernels import signals as sig
from tdcompile.kernels.signals import fence_sys, peer_ptr, record_error, signal, wait_geq
from tdcompile.kernels.symm import OPS, Workspace, _Unsupported, phased
from tdcompile.kernels.tiles import add_bias, col_offsets, mm_tile, num_sms, pick_config, preload, swizzle, unsupported_gemm_reason

OP_ID = OPS.index("gemm_all_reduce")
REDUCE_CTAS = 16


@triton.jit(do_not_specialize=["M", "cap", "rank"])
def _gemm_ar_producer(a_ptr, b_ptr, bias_ptr, stage_tab, flag_tab, cap, epoch_ptr, M, N, K, stride_am, stride_ak,
                      stride_bk, stride_bn, rank, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                      BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
                      GROUP_SIZE_M: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    dt = a_ptr.dtype.element_ty
    epoch = tl.load(epoch_ptr)
    stage = peer_ptr(stage_tab, rank, dt) + (epoch % 2).to(tl.int64) * cap
    flags = peer_ptr(flag_tab, rank, tl.int32)
    num_pid_m = tl.cdiv(M, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    for t in range(pid, num_pid_m * num_pid_n, G):
        pid_m, pid_n = swizzle(t, num_pid_m, num_pid_n, GROUP_SIZE_M)
        rows = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
        cols = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
        ccols = col_offsets(pid_n, N, BLOCK_SIZE_N, EVEN_N)
        acc = mm_tile(a_ptr, b_ptr, tl.where(rows < M, rows, 0), ccols, K, stride_am,
                      stride_ak, stride_bk, stride_bn, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, EVEN_K)
        acc = add_bias(acc, bias_ptr, ccols, HAS_BIAS)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        tl.store(stage + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(dt), mask=mask)
        fence_sys()
        tl.debug_barrier()
        signal(flags + t, epoch)


@triton.jit(do_not_specialize=["M", "cap", "rank", "err_code", "timeout_us"])
def _gemm_ar_reducer(out_ptr, stage_tab, flag_tab, cap, epoch_ptr, M, N, err_addr, err_code, rank, timeout_us,
                     WORLD: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
                     GROUP_SIZE_M: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    dt = out_ptr.dtype.element_ty
    epoch = tl.load(epoch_ptr)
    area = (epoch % 2).to(tl.int64) * cap
    tmo = timeout_us.to(tl.int64) * 1000
    num_pid_m = tl.cdiv(M, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    ok = tl.full((), 1, tl.int32)
    for t in range(pid, num_pid_m * num_pid_n, G):
        pid_m, pid_n = swizzle(t, num_pid_m, num_pid_n, GROUP_SIZE_M)
        rows = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
        cols = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        for s in tl.static_range(WORLD):
            ok = ok & wait_geq(peer_ptr(flag_tab, s, tl.int32) + t, epoch, tmo * ok)
            tl.debug_barrier()
            p = peer_ptr(stage_tab, s, dt) + area
            acc += tl.load(p + offs, mask=mask & (ok != 0), other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(out_ptr + offs, acc.to(dt), mask=mask)
    if ok == 0:
        record_error(err_addr, err_code)


def unsupported_reason(ws: Workspace, a: torch.Tensor, b: torch.Tensor, bias) -> str | None:
    return unsupported_gemm_reason(ws, a, [b], bias, a.shape[0])


@phased
def gemm_all_reduce(ws: Workspace, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``all_reduce(a @ b + bias)`` for the ranks of ``ws``; launched on the current stream."""
    ws.check()
    reason = unsupported_reason(ws, a, b, bias)
    if reason:
        raise _Unsupported(reason)
    M, K = a.shape
    N = b.shape[1]
    cfg = pick_config(M, N, K)
    stage = ws.region("gemm_all_reduce.stage", 2 * ws.max_m * N * a.element_size())
    cap = stage.nbytes // (2 * a.element_size())   # fixed by the region size (only grows, fully synced)
    max_tiles = triton.cdiv(ws.max_m, 64) * triton.cdiv(N, 64)
    flags = ws.region("gemm_all_reduce.flags", 4 * max_tiles)
    if M * N > cap or triton.cdiv(M, cfg.BLOCK_SIZE_M) * triton.cdiv(N, cfg.BLOCK_SIZE_N) * 4 > flags.nbytes:
        raise _Unsupported("gemm_all_reduce workspace too small for this shape")
    out = torch.empty((M, N), dtype=a.dtype, device=a.device) if out is None else out
    sms = num_sms()
    tiles = triton.cdiv(M, cfg.BLOCK_SIZE_M) * triton.cdiv(N, cfg.BLOCK_SIZE_N)
    share = ws.world if ws.sim is not None else 1
    n_red = max(1, min(REDUCE_CTAS // share, tiles))
    n_gemm = max(1, min(tiles, sms // share - n_red))
    epoch = ws.bump_epoch("gemm_all_reduce")
    cur = torch.cuda.current_stream()
    ws.side.wait_stream(cur)
    bias_arg = bias if bias is not None else a
    _launch(_gemm_ar_producer, (n_gemm,),
        a, b, bias_arg, stage.ptrs, flags.ptrs, cap, epoch, M, N, K, a.stride(0), a.stride(1), b.stride(0),
        b.stride(1), ws.rank, HAS_BIAS=bias is not None, EVEN_K=K % cfg.BLOCK_SIZE_K == 0, EVEN_N=N % cfg.BLOCK_SIZE_N == 0,
        BLOCK_SIZE_M=cfg.BLOCK_SIZE_M, BLOCK_SIZE_N=cfg.BLOCK_SIZE_N, BLOCK_SIZE_K=cfg.BLOCK_SIZE_K,
        GROUP_SIZE_M=cfg.GROUP_SIZE_M, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    preload(_gemm_ar_reducer, (n_red,), out, stage.ptrs, flags.ptrs, cap, epoch, M, N, ws.err_addr,
            sig.error_code(OP_ID, ws.rank, sig.WHAT_TILE_FLAG), ws.rank, ws.timeout_us, WORLD=ws.world,
            BLOCK_SIZE_M=cfg.BLOCK_SIZE_M, BLOCK_SIZE_N=cfg.BLOCK_SIZE_N, GROUP_SIZE_M=cfg.GROUP_SIZE_M,
            num_warps=8)
    yield
    with torch.cuda.stream(ws.side):
        _launch(_gemm_ar_reducer, (n_red,),
            out, stage.ptrs, flags.ptrs, cap, epoch, M, N, ws.err_addr,
            sig.error_code(OP_ID, ws.rank, sig.WHAT_TILE_FLAG), ws.rank, ws.timeout_us, WORLD=ws.world,
            BLOCK_SIZE_M=cfg.BLOCK_SIZE_M, BLOCK_SIZE_N=cfg.BLOCK_SIZE_N, GROUP_SIZE_M=cfg.GROUP_SIZE_M,
            num_warps=8)
    cur.wait_stream(ws.side)
    return out


def _launch(kernel, grid, *args, **kwargs):
    preload(kernel, grid, *args, **kwargs)
    kernel[grid](*args, **kwargs)
