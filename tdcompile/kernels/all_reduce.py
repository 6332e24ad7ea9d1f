"""All-reduce over symmetric memory, P2P loads/stores only (no multicast).

* one-shot: every rank copies its input into its symmetric buffer, a per-block barrier
  makes the peers' chunks visible, and every rank reads the chunk of all W ranks and sums
  in fp32 in rank order 0..W-1 (bitwise identical results on every rank);
* two-shot: reduce-scatter (rank r reduces sub-chunk r of every block chunk and stores it
  in its ``res`` area), second barrier, all-gather (read sub-chunk s from rank s).

Buffers are double-buffered by the parity of the device epoch, so one barrier per phase
suffices (a peer that reached call e+1 finished every read of call e: same-stream order).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tdcompile.kernels import signals as sig
from tdcompile.kernels.signals import block_barrier, peer_ptr, record_error
from tdcompile.kernels.symm import OPS, PAD_SLOTS, MAX_WORLD, Workspace, _Unsupported, phased

OP_ID = OPS.index("all_reduce")
ONE_SHOT_MAX_BYTES_W2 = 4 << 20
ONE_SHOT_MAX_BYTES = 256 << 10


@triton.jit(do_not_specialize=["n", "cap", "rank", "err_code", "timeout_us"])
def _all_reduce_kernel(x_ptr, out_ptr, n, buf_tab, cap, pad_tab, pad_off, epoch_ptr, err_addr, err_code, rank,
                       timeout_us, WORLD: tl.constexpr, ONE_SHOT: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       PAD_STRIDE: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    dt = x_ptr.dtype.element_ty
    epoch = tl.load(epoch_ptr)
    tmo = timeout_us.to(tl.int64) * 1000
    area = (epoch % 2).to(tl.int64) * 2 * cap          # parity area: [in (cap) | res (cap)]
    my_in = peer_ptr(buf_tab, rank, dt) + area
    nblk = tl.cdiv(n, BLOCK_SIZE)
    offs = tl.arange(0, BLOCK_SIZE)
    for it in range(pid, nblk, G):
        o = it * BLOCK_SIZE + offs
        m = o < n
        tl.store(my_in + o, tl.load(x_ptr + o, mask=m), mask=m)
    ok = block_barrier(pad_tab, pad_off, pid, rank, epoch, tmo, WORLD)
    if ONE_SHOT:
        if ok != 0:
            for it in range(pid, nblk, G):
                o = it * BLOCK_SIZE + offs
                m = o < n
                acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
                for s in tl.static_range(WORLD):
                    p = peer_ptr(buf_tab, s, dt) + area
                    acc += tl.load(p + o, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
                tl.store(out_ptr + o, acc.to(dt), mask=m)
    else:
        SUB: tl.constexpr = BLOCK_SIZE // WORLD
        so = tl.arange(0, SUB)
        if ok != 0:
            for it in range(pid, nblk, G):
                o = it * BLOCK_SIZE + rank * SUB + so
                m = o < n
                acc = tl.zeros([SUB], dtype=tl.float32)
                for s in tl.static_range(WORLD):
                    p = peer_ptr(buf_tab, s, dt) + area
                    acc += tl.load(p + o, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
                v = acc.to(dt)
                tl.store(my_in + cap + o, v, mask=m)
                tl.store(out_ptr + o, v, mask=m)
        ok = ok & block_barrier(pad_tab, pad_off + PAD_STRIDE, pid, rank, epoch, tmo * ok, WORLD)
        if ok != 0:
            for it in range(pid, nblk, G):
                for s in tl.static_range(WORLD):
                    o = it * BLOCK_SIZE + s * SUB + so
                    m = o < n
                    p = peer_ptr(buf_tab, s, dt) + area + cap
                    tl.store(out_ptr + o, tl.load(p + o, mask=m, cache_modifier=".cg"), mask=m)
    if ok == 0:
        record_error(err_addr, err_code)


def config(ws: Workspace, nbytes: int, n: int, sms: int):
    """(one_shot, BLOCK_SIZE, grid): pure function of the shape and world (same on all ranks)."""
    one_shot = nbytes <= (ONE_SHOT_MAX_BYTES_W2 if ws.world == 2 else ONE_SHOT_MAX_BYTES)
    block = 2048 if one_shot else 4096
    limit = sms // ws.world if ws.sim is not None else sms
    grid = max(1, min(triton.cdiv(n, block), limit, PAD_SLOTS))
    return one_shot, block, grid


def unsupported_reason(ws: Workspace, x: torch.Tensor) -> str | None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {x.dtype} (fused kernels take bf16/fp16)"
    if x.dim() == 0 or x.numel() == 0:
        return "empty or 0-d input"
    rows = x.numel() // x.shape[-1]
    if rows > ws.max_m:
        return f"{rows} rows > workspace max M {ws.max_m} (TDCOMPILE_MAX_M)"
    return None


@phased
def all_reduce(ws: Workspace, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``ws``; launched on the current stream."""
    ws.check()
    reason = unsupported_reason(ws, x)
    if reason:
        raise _Unsupported(reason)
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    n = x.numel()
    reg = ws.region("all_reduce", 4 * ws.max_m * x.shape[-1] * x.element_size())
    cap = reg.nbytes // (4 * x.element_size())     # fixed by the region size (only grows, fully synced)
    if n > cap:
        raise _Unsupported(f"{n} elements > all_reduce workspace ({cap})")
    out = torch.empty_like(x) if out is None else out
    from tdcompile.kernels.tiles import num_sms
    one_shot, block, grid = config(ws, n * x.element_size(), n, num_sms())
    epoch = ws.bump_epoch("all_reduce")
    yield
    _all_reduce_kernel[(grid,)](
        x, out, n, reg.ptrs, cap, ws.pads.ptrs, 0, epoch, ws.err_addr,
        sig.error_code(OP_ID, ws.rank, sig.WHAT_BARRIER), ws.rank, ws.timeout_us,
        WORLD=ws.world, ONE_SHOT=one_shot, BLOCK_SIZE=block, PAD_STRIDE=PAD_SLOTS * MAX_WORLD,
        num_warps=8)
    return out
