"""GEMM + reduce-scatter: a persistent GEMM computes the row segments bound for the peers
first (rank+1, rank+2, ...) and its own segment last; each tile is stored straight into
the destination rank's symmetric staging buffer (slot = source rank) and published with a
per-tile flag (= device epoch) in the destination's flag array.  A reducer kernel then
consumes this rank's segment tile by tile as the W flags arrive (all reads local), sums
in fp32 in rank order and writes an ordinary [M/W, N] output.

Staging is double-buffered by epoch parity (same argument as gemm_all_reduce).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tdcompile.kernels import signals as sig
from tdcompile.kernels.signals import fence_sys, peer_ptr, record_error, signal, wait_geq
from tdcompile.kernels.symm import OPS, Workspace, _Unsupported, phased
from tdcompile.kernels.tiles import add_bias, col_offsets, mm_tile, num_sms, pick_config, preload, swizzle, unsupported_gemm_reason

OP_ID = OPS.index("gemm_reduce_scatter")


@triton.jit(do_not_specialize=["M_seg", "cap", "rank"])
def _gemm_rs_producer(a_ptr, b_ptr, bias_ptr, stage_tab, flag_tab, cap, epoch_ptr, M_seg, N, K, stride_am,
                      stride_ak, stride_bk, stride_bn, rank, WORLD: tl.constexpr, HAS_BIAS: tl.constexpr,
                      EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
                      BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    dt = a_ptr.dtype.element_ty
    epoch = tl.load(epoch_ptr)
    area = (epoch % 2).to(tl.int64) * cap
    num_pid_m = tl.cdiv(M_seg, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    tps = num_pid_m * num_pid_n
    for t in range(pid, WORLD * tps, G):
        i = t // tps
        lt = t % tps
        d = (rank + 1 + i) % WORLD                      # peers first, own segment last
        pid_m, pid_n = swizzle(lt, num_pid_m, num_pid_n, GROUP_SIZE_M)
        lrows = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
        cols = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
        ccols = col_offsets(pid_n, N, BLOCK_SIZE_N, EVEN_N)
        grows = d * M_seg + tl.where(lrows < M_seg, lrows, 0)
        acc = mm_tile(a_ptr, b_ptr, grows, ccols, K, stride_am, stride_ak, stride_bk,
                      stride_bn, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, EVEN_K)
        acc = add_bias(acc, bias_ptr, ccols, HAS_BIAS)
        dst = peer_ptr(stage_tab, d, dt) + area + rank.to(tl.int64) * M_seg * N
        mask = (lrows < M_seg)[:, None] & (cols < N)[None, :]
        tl.store(dst + lrows[:, None].to(tl.int64) * N + cols[None, :], acc.to(dt), mask=mask)
        fence_sys()
        tl.debug_barrier()
        signal(peer_ptr(flag_tab, d, tl.int32) + rank * tps + lt, epoch)


@triton.jit(do_not_specialize=["M_seg", "cap", "rank", "err_code", "timeout_us"])
def _gemm_rs_reducer(out_ptr, stage_tab, flag_tab, cap, epoch_ptr, M_seg, N, err_addr, err_code, rank,
                     timeout_us, WORLD: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
                     GROUP_SIZE_M: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    dt = out_ptr.dtype.element_ty
    epoch = tl.load(epoch_ptr)
    tmo = timeout_us.to(tl.int64) * 1000
    stage = peer_ptr(stage_tab, rank, dt) + (epoch % 2).to(tl.int64) * cap
    flags = peer_ptr(flag_tab, rank, tl.int32)
    num_pid_m = tl.cdiv(M_seg, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    tps = num_pid_m * num_pid_n
    ok = tl.full((), 1, tl.int32)
    for lt in range(pid, tps, G):
        pid_m, pid_n = swizzle(lt, num_pid_m, num_pid_n, GROUP_SIZE_M)
        rows = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
        cols = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
        mask = (rows < M_seg)[:, None] & (cols < N)[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        for s in tl.static_range(WORLD):
            ok = ok & wait_geq(flags + s * tps + lt, epoch, tmo * ok)
            tl.debug_barrier()
            src = stage + s * M_seg.to(tl.int64) * N
            acc += tl.load(src + offs, mask=mask & (ok != 0), other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(out_ptr + offs, acc.to(dt), mask=mask)
    if ok == 0:
        record_error(err_addr, err_code)


def unsupported_reason(ws: Workspace, a: torch.Tensor, b: torch.Tensor, bias) -> str | None:
    if a.dim() == 2 and a.shape[0] % ws.world:
        return f"M={a.shape[0]} not divisible by world size {ws.world}"
    return unsupported_gemm_reason(ws, a, [b], bias, a.shape[0])


@phased
def gemm_reduce_scatter(ws: Workspace, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """``reduce_scatter(a @ b + bias)`` over dim 0: this rank gets rows [r*M/W, (r+1)*M/W)."""
    ws.check()
    reason = unsupported_reason(ws, a, b, bias)
    if reason:
        raise _Unsupported(reason)
    M, K = a.shape
    N = b.shape[1]
    W = ws.world
    M_seg = M // W
    cfg = pick_config(M, N, K)
    stage = ws.region("gemm_reduce_scatter.stage", 2 * ws.max_m * N * a.element_size())
    cap = stage.nbytes // (2 * a.element_size())   # fixed by the region size (only grows, fully synced)
    max_tps = triton.cdiv(triton.cdiv(ws.max_m, W), 64) * triton.cdiv(N, 64)
    flags = ws.region("gemm_reduce_scatter.flags", 4 * W * max_tps)
    tiles_seg = triton.cdiv(M_seg, cfg.BLOCK_SIZE_M) * triton.cdiv(N, cfg.BLOCK_SIZE_N)
    if M * N > cap or 4 * W * tiles_seg > flags.nbytes:
        raise _Unsupported("gemm_reduce_scatter workspace too small for this shape")
    out = torch.empty((M_seg, N), dtype=a.dtype, device=a.device) if out is None else out
    sms = num_sms() // (W if ws.sim is not None else 1)
    tiles_seg = triton.cdiv(M_seg, cfg.BLOCK_SIZE_M) * triton.cdiv(N, cfg.BLOCK_SIZE_N)
    epoch = ws.bump_epoch("gemm_reduce_scatter")
    bias_arg = bias if bias is not None else a
    _launch(_gemm_rs_producer, (max(1, min(sms, W * tiles_seg)),),
        a, b, bias_arg, stage.ptrs, flags.ptrs, cap, epoch, M_seg, N, K, a.stride(0), a.stride(1), b.stride(0),
        b.stride(1), ws.rank, WORLD=W, HAS_BIAS=bias is not None, EVEN_K=K % cfg.BLOCK_SIZE_K == 0, EVEN_N=N % cfg.BLOCK_SIZE_N == 0,
        BLOCK_SIZE_M=cfg.BLOCK_SIZE_M, BLOCK_SIZE_N=cfg.BLOCK_SIZE_N, BLOCK_SIZE_K=cfg.BLOCK_SIZE_K,
        GROUP_SIZE_M=cfg.GROUP_SIZE_M, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    yield
    _launch(_gemm_rs_reducer, (max(1, min(sms, tiles_seg)),),
        out, stage.ptrs, flags.ptrs, cap, epoch, M_seg, N, ws.err_addr,
        sig.error_code(OP_ID, ws.rank, sig.WHAT_TILE_FLAG), ws.rank, ws.timeout_us, WORLD=W,
        BLOCK_SIZE_M=cfg.BLOCK_SIZE_M, BLOCK_SIZE_N=cfg.BLOCK_SIZE_N, GROUP_SIZE_M=cfg.GROUP_SIZE_M, num_warps=8)
    return out


def _launch(kernel, grid, *args, **kwargs):
    preload(kernel, grid, *args, **kwargs)
    kernel[grid](*args, **kwargs)
