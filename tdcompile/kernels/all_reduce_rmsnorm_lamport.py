"""All-reduce + residual add + RMSNorm on the Lamport protocol (``all_reduce_rmsnorm``, variant
``lamport``): the barrier-free push of ``all_reduce_lamport.py`` with rows as the unit of work and
the epilogue of ``all_reduce_rmsnorm.py``::

    ar           = all_reduce(x)          # fp32 sum in rank order of the pushed words, cast once
    new_residual = residual + ar          # in dtype (HF's ``residual + hidden_states``)
    normed       = weight * rmsnorm(new_residual).to(dtype)

One call (block b, rows b, b+G, ...; s = the block's slot counter):
  1. push each of its rows, encoded (``bits ^ 0x8000``, -0.0 canonicalised), into segment
     ``rank`` of slot s of every rank's buffer (128-bit stores when N % 8 == 0);
  2. clear this rank's slot (s+2)%3, the previous call's, for the elements that call used;
  3. poll each row's W segments in its own slot s until no word is empty (bounded), sum, then
     the epilogue on the whole row in registers;
  4. advance the control entries it stands for.

It shares the region, the control entries and the slot rotation with ``all_reduce_lamport``
(same invariants, see that docstring: a peer is at most one call ahead), so calls of both may
interleave as long as every rank makes the same sequence of calls.  Each call polls only what
that same call pushes on every rank ([0, M*N)); what it pushed is cleared two calls later.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tdcompile.kernels import all_reduce_lamport as lam
from tdcompile.kernels.all_reduce import _bases, err_base
from tdcompile.kernels.all_reduce_lamport import _advance, _clear, _poll, _push, _state, _sum_words
from tdcompile.kernels.all_reduce_rmsnorm import _epilogue, operand_reason
from tdcompile.kernels.signals import globaltimer, peer_base, record_error
from tdcompile.kernels.symm import OPS, Workspace, _Unsupported, phased

OP_ID = OPS.index("all_reduce_rmsnorm")
NUM_WARPS = 8
DEFAULT_CTAS = 128      # one row per CTA at 128x5120: 8.1 us vs 9.4 at 64, W=2 (all_reduce-h200-w2-2026-11-27-full.json)
CLEAR_BLOCK = 2048


@triton.jit(do_not_specialize=["M", "n8_arg", "cap8", "err_addr", "err_base", "rank", "timeout_us"])
def _ar_rms_lamport(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, M, n8_arg, eps, tab, ctl_ptr, cap8, err_addr,
                    err_base, rank, timeout_us, WORLD: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr,
                    MAXB: tl.constexpr, DOFF: tl.constexpr, CLEAR_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    dt = out_ptr.dtype.element_ty
    cap = cap8 * 8
    s, prev = _state(ctl_ptr, pid, MAXB)
    cols = tl.arange(0, BLOCK_N)
    cm = cols < N
    sign = tl.full([BLOCK_N], -32768, tl.int16)
    # 1. push my rows into segment `rank` of slot s of every rank's buffer
    b0, b1, b2, b3, b4, b5, b6, b7 = _bases(tab, DOFF + (s * WORLD + rank) * cap, tl.int16, WORLD)
    for row in range(pid, M, G):
        o = row * N + cols
        _push(b0, b1, b2, b3, b4, b5, b6, b7, o, tl.load(x_ptr + o, mask=cm, other=0.0), cm, sign, WORLD)
    # 2. clear my previous slot (no peer writes it before this kernel ends)
    own = peer_base(tab, rank, tl.int16) + DOFF
    _clear(own + ((s + 2) % 3) * WORLD * cap, cap, prev, pid, G, CLEAR_BLOCK, WORLD)
    # 3. wait for each row's W segments, sum in rank order, epilogue
    cur = own + s * WORLD * cap
    tmo = timeout_us.to(tl.int64) * 1000
    t0 = globaltimer()
    w = tl.load(w_ptr + cols, mask=cm, other=0.0)
    ok = 1
    for row in range(pid, M, G):
        if ok != 0:
            o = row * N + cols
            ok, e0, e1, e2, e3, e4, e5, e6, e7 = _poll(cur, cap, o, cm, t0, tmo, BLOCK_N, WORLD)
            if ok != 0:
                acc = _sum_words(e0, e1, e2, e3, e4, e5, e6, e7, sign, dt, WORLD)
                r = tl.load(res_ptr + o, mask=cm, other=0.0)
                nr, y = _epilogue(acc.to(dt), r, w, cm, eps, N, dt)
                tl.store(res_out_ptr + o, nr, mask=cm)
                tl.store(out_ptr + o, y, mask=cm)
    if ok == 0:
        record_error(err_addr, err_base + 6)   # as all_reduce_lamport: "timed out waiting for a peer"
    # 4. advance the state of every control entry this block stands for
    _advance(ctl_ptr, pid, G, s, n8_arg, MAXB)


def unsupported_reason(ws: Workspace, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> str | None:
    return lam.unsupported_reason(ws, x) or operand_reason(x, residual, weight)


def prepare(ws: Workspace, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> str | None:
    """``unsupported_reason``, and on None the shared Lamport region allocated (a collective)."""
    reason = unsupported_reason(ws, x, residual, weight)
    if reason is None:
        lam.region(ws)
    return reason


def num_warps(world: int, block_n: int) -> int:
    """8 warps; 16 for rows wider than 8192 (as ``all_reduce_rmsnorm``) or when the W row copies
    a thread holds would exceed 32 KiB-elements per CTA (W=8, N=5120 needs ~250 registers at 8)."""
    return 16 if block_n > 8192 or block_n * world > 8192 * 4 else NUM_WARPS


def grid_size(ws: Workspace, rows: int, ctas: int | None = None) -> int:
    """Pure function of (rows, world, ctas, SM count, simulated or not): same on every rank."""
    from tdcompile.kernels.tiles import num_sms
    limit = num_sms() if ws.sim is None else max(1, num_sms() // ws.world)
    return max(1, min(rows, ctas or DEFAULT_CTAS, limit, lam.MAX_CTAS))


@phased
def all_reduce_rmsnorm_lamport(ws: Workspace, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float, out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
                               ctas: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, new_residual)`` of ``residual + all_reduce(x)`` (module docstring), one
    barrier-free kernel on the current stream; ``x`` any shape ``[..., N]``, N <= ``MAX_N``."""
    ws.check()
    reason = unsupported_reason(ws, x, residual, weight)
    if reason:
        raise _Unsupported(reason)
    N = x.shape[-1]
    M = x.numel() // N
    reg, cap = lam.region(ws)
    x, residual, weight = x.contiguous(), residual.contiguous(), weight.contiguous()
    out = torch.empty_like(x) if out is None else out
    residual_out = torch.empty_like(x) if residual_out is None else residual_out
    for t in (out, residual_out):
        if t.shape != x.shape or t.dtype != x.dtype or not t.is_contiguous():
            raise ValueError(f"outputs must be contiguous {tuple(x.shape)} {x.dtype}")
    ctl = reg.local[:lam.CTL_BYTES].view(torch.int32)
    args = (x, residual, weight, out, residual_out, M, triton.cdiv(M * N, lam.VEC), float(eps), reg.ptrs, ctl,
            cap // lam.VEC, ws.err_addr, err_base(OP_ID, ws.rank), ws.rank, ws.timeout_us)
    block_n = triton.next_power_of_2(N)
    kw = dict(WORLD=ws.world, N=N, BLOCK_N=block_n, MAXB=lam.MAX_CTAS, DOFF=lam.DATA_OFF, CLEAR_BLOCK=CLEAR_BLOCK,
              num_warps=num_warps(ws.world, block_n))
    grid = (grid_size(ws, M, ctas),)
    from tdcompile.kernels.tiles import preload
    preload(_ar_rms_lamport, grid, *args, **kw)      # compile + load before anything waits on a peer
    yield
    _ar_rms_lamport[grid](*args, **kw)
    return out, residual_out
