"""All-reduce + residual add + RMSNorm on the two-shot Lamport protocol (``all_reduce_rmsnorm``,
variant ``lamport2``): ``all_reduce_lamport2``'s reduce-scatter and all-gather pushes, then the
residual add and the RMSNorm by every rank on whole rows::

    ar           = all_reduce(x)          # fp32 sum in rank order of the pushed words, cast once
    new_residual = residual + ar          # in dtype, with THIS rank's residual (HF's ``residual + h``)
    normed       = weight * rmsnorm(new_residual).to(dtype)

Why: in TP decode every all-reduce is followed by HF's ``residual + h`` and an RMSNorm, which
Inductor runs as one more kernel (~3.4 us at 128x5120 on 4xH200, plus its launch gap, 16 times
per 8-layer step: ``scripts/trace_summary.py`` on bench-h200-tp4-20261127-113833).  Here the
all-gather stage reads whole rows, so the add and the norm run on rows already in registers.
The residual is each rank's own, never the owner's: under TP it is replicated, but the op's
contract is ``residual + all_reduce(x)`` with the local residual, and a rank whose residual
differs must get its own result (the real-process family test feeds per-rank residuals).

One call (slot s from the control block of entry ``pid``; chunks of ``BLOCK`` elements, shards
of ``S`` elements as in ``all_reduce_lamport2``, whose region, control entries and slot rotation
this kernel shares, so calls of both interleave):
  1. RS push: every chunk of ``x``, 128-bit, into segment ``rank`` of slot s of its owner;
  2. clear own slot (s+2)%3: the RS segments of this rank's previous shard, the previous AG range;
  3. reduce: for each chunk of this rank's shard that this CTA pushed in stage 1, poll the W RS
     segments (bounded), sum in fp32 in rank order, cast, and push the result into AG slot s
     of EVERY rank (own included);
  4. rows b, b+G, ...: poll own AG slot s over the row (bounded), decode, add this rank's
     residual row in dtype, write ``residual_out``, normalise, write ``out`` (the reduced words
     are the same on every rank, so with equal residuals the outputs are bit-identical);
  5. advance the control entries.
A timed-out poll records an error (op ``all_reduce_rmsnorm``, this rank); the block skips the rest.

**Progress and clears.**  Stage 3 of CTA b waits only for stage 1 of CTA b on every rank (the
chunk -> CTA map is the same in both stages); stage 4 waits for stage 3 of any CTA of the
owners, which waits for nothing but stage-1 pushes.  Every CTA is resident (grid <= SMs, SMs / W
simulated), so every wait ends.  Every row depends on every rank's stage-1 push of this call,
so the argument of ``all_reduce_lamport2`` for its clears holds unchanged: a peer is at most one
call ahead and never writes the slot being cleared.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tdcompile.kernels import all_reduce_lamport as lam
from tdcompile.kernels.all_reduce import _bases, err_base
from tdcompile.kernels.all_reduce_lamport import _advance, _clear, _poll, _push, _state, _sum_words
from tdcompile.kernels.all_reduce_lamport2 import UNIT, _poll1, region
from tdcompile.kernels.all_reduce_rmsnorm import _add_residual, _rmsnorm, operand_reason
from tdcompile.kernels.signals import globaltimer, peer_base, record_error
from tdcompile.kernels.symm import OPS, Workspace, _Unsupported, phased

OP_ID = OPS.index("all_reduce_rmsnorm")
DEFAULT_CTAS = 128


@triton.jit(do_not_specialize=["M", "n_arg", "n8_arg", "cap8", "err_addr", "err_base", "rank", "timeout_us"])
def _ar_rms_lamport2(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, M, n_arg, n8_arg, eps, tab, ctl_ptr, cap8,
                     err_addr, err_base, rank, timeout_us, WORLD: tl.constexpr, EVEN: tl.constexpr,
                     BLOCK: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr, MAXB: tl.constexpr,
                     DOFF: tl.constexpr, UNIT: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    dt = out_ptr.dtype.element_ty
    n8 = n8_arg * 8                       # peer traffic: whole 16-B vectors
    if EVEN:
        n = n8
    else:
        n = n_arg
    cap = cap8 * 8
    s, prev = _state(ctl_ptr, pid, MAXB)
    offs = tl.arange(0, BLOCK)
    sign = tl.full([BLOCK], -32768, tl.int16)
    nblk = tl.cdiv(n8, BLOCK)
    S = tl.cdiv(tl.cdiv(n8, WORLD), UNIT) * UNIT            # shard (elements), multiple of UNIT
    rs_off = DOFF + (s * WORLD + rank) * cap                  # RS slot s, segment `rank`
    # 1. reduce-scatter push: each chunk of x into its owner's buffer only
    for it in range(pid, nblk, G):
        o = it * BLOCK + offs
        dst = peer_base(tab, (it * BLOCK) // S, tl.int16) + rs_off
        v = tl.load(x_ptr + o, mask=o < n, other=0.0)
        e = v.to(tl.int16, bitcast=True) ^ sign
        tl.store(dst + o, tl.where(e == 0, sign, e), mask=o < n8)
    # 2. clear own previous slot: RS segments of the previous shard, the whole previous AG range
    own = peer_base(tab, rank, tl.int16) + DOFF
    old = (s + 2) % 3
    Sp = tl.cdiv(tl.cdiv(prev, WORLD), UNIT) * UNIT
    lo = tl.minimum(rank * Sp, prev)
    hi = tl.minimum(lo + Sp, prev)
    _clear(own + old * WORLD * cap + lo, cap, hi - lo, pid, G, BLOCK, WORLD)
    ag = own + 3 * WORLD * cap
    _clear(ag + old * cap, cap, prev, pid, G, BLOCK, 1)
    # 3. reduce this rank's shard, push the result into AG slot s of every rank
    tmo = timeout_us.to(tl.int64) * 1000
    t0 = globaltimer()
    ok = 1
    lo = rank * S                                             # this rank's shard [lo, hi) (empty if lo >= n8)
    hi = tl.minimum(lo + S, n8)
    cur = own + s * WORLD * cap
    a0, a1, a2, a3, a4, a5, a6, a7 = _bases(tab, DOFF + 3 * WORLD * cap + s * cap, tl.int16, WORLD)
    for it in range(pid, nblk, G):        # the chunks this CTA pushed in stage 1: no wait on another CTA
        if (ok != 0) & (it * BLOCK >= lo) & (it * BLOCK < hi):
            o = it * BLOCK + offs
            ok, e0, e1, e2, e3, e4, e5, e6, e7 = _poll(cur, cap, o, o < hi, t0, tmo, BLOCK, WORLD)
            if ok != 0:
                acc = _sum_words(e0, e1, e2, e3, e4, e5, e6, e7, sign, dt, WORLD)
                _push(a0, a1, a2, a3, a4, a5, a6, a7, o, acc.to(dt), o < hi, sign, WORLD)
    # 4. whole rows from own AG slot s: + this rank's residual, then the norm
    cur = ag + s * cap
    cols = tl.arange(0, BLOCK_N)
    cm = cols < N
    rsign = tl.full([BLOCK_N], -32768, tl.int16)
    w = tl.load(w_ptr + cols, mask=cm, other=0.0)
    for row in range(pid, M, G):
        if ok != 0:
            o = row * N + cols
            ok, e = _poll1(cur, o, cm, t0, tmo, BLOCK_N)
            if ok != 0:
                r = tl.load(res_ptr + o, mask=cm, other=0.0)
                nr = _add_residual((e ^ rsign).to(dt, bitcast=True), r, dt)
                tl.store(res_out_ptr + o, nr, mask=cm)
                tl.store(out_ptr + o, _rmsnorm(nr, w, cm, eps, N, dt), mask=cm)
    if ok == 0:
        record_error(err_addr, err_base + 6)   # lam.WHAT_LAMPORT: "timed out waiting for a peer"
    # 5. advance the state of every control entry this block stands for
    _advance(ctl_ptr, pid, G, s, n8_arg, MAXB)


# ------------------------------------------------------------------------------ host side
def unsupported_reason(ws: Workspace, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> str | None:
    return lam.unsupported_reason(ws, x) or operand_reason(x, residual, weight)


def prepare(ws: Workspace, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> str | None:
    """``unsupported_reason``, and on None the shared two-shot Lamport region allocated (a collective)."""
    reason = unsupported_reason(ws, x, residual, weight)
    if reason is None:
        region(ws)
    return reason


def num_warps(block_n: int) -> int:
    """8 warps (a 2048-element chunk, a 5120-wide row as 20 elements a thread); 16 for rows wider
    than 8192 (the chunk is then 4096 = ``UNIT``, still a divisor of the shard)."""
    return 16 if block_n > 8192 else 8


@phased
def all_reduce_rmsnorm_lamport2(ws: Workspace, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float, out: torch.Tensor | None = None,
                                residual_out: torch.Tensor | None = None,
                                ctas: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, new_residual)`` of ``residual + all_reduce(x)`` (module docstring), one
    barrier-free kernel on the current stream; ``x`` any shape ``[..., N]``, N <= ``MAX_N``;
    ``ctas`` may change from call to call as long as it is the same on every rank."""
    ws.check()
    reason = unsupported_reason(ws, x, residual, weight)
    if reason:
        raise _Unsupported(reason)
    N = x.shape[-1]
    n = x.numel()
    reg, cap = region(ws)
    x, residual, weight = x.contiguous(), residual.contiguous(), weight.contiguous()
    out = torch.empty_like(x) if out is None else out
    residual_out = torch.empty_like(x) if residual_out is None else residual_out
    for t in (out, residual_out):
        if t.shape != x.shape or t.dtype != x.dtype or not t.is_contiguous():
            raise ValueError(f"outputs must be contiguous {tuple(x.shape)} {x.dtype}")
    even = n % lam.VEC == 0
    n8 = triton.cdiv(n, lam.VEC)
    ctl = reg.local[:lam.CTL_BYTES].view(torch.int32)
    args = (x, residual, weight, out, residual_out, n // N, n8 if even else n, n8, float(eps), reg.ptrs, ctl,
            cap // lam.VEC, ws.err_addr, err_base(OP_ID, ws.rank), ws.rank, ws.timeout_us)
    block_n = triton.next_power_of_2(N)
    nw = num_warps(block_n)
    block = nw * 32 * lam.VEC
    kw = dict(WORLD=ws.world, EVEN=even, BLOCK=block, N=N, BLOCK_N=block_n, MAXB=lam.MAX_CTAS,
              DOFF=lam.DATA_OFF, UNIT=UNIT, num_warps=nw)
    yield from lam.launch(_ar_rms_lamport2, (lam.grid_size(ws, n, ctas or DEFAULT_CTAS, block),), args, kw)
    return out, residual_out
