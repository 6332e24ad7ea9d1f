"""Barrier-free TWO-shot all-reduce, Lamport style: a reduce-scatter push, then an all-gather push.

The one-shot Lamport kernel (``all_reduce_lamport``) sends each rank's whole input to every
peer: (W-1) x n elements out per rank.  At W=4 and 1.3 MB that is 3.9 MB, bandwidth-bound
(16.5 us on 4xH200, where the two-shot kernel with barriers takes 13.2).  Here each rank sends
n x (W-1)/W twice -- 2 x 0.98 MB at W=4 -- and there is still no barrier, no fence, no atomic:
the data is the flag in both stages.  Same contract as the one-shot kernel: bf16/fp16, any shape,
at most ``LAMPORT_MAX_BYTES`` per rank, fp32 sum in rank order 0..W-1, cast once (the owner
casts, everyone receives those bits: bit-identical on every rank), -0.0 on every rank -> +0.0.

**Ownership.**  The flat input (padded to whole 16-B vectors, ``n8`` elements) is cut into W
contiguous shards of ``S = ceil(ceil(n8 / W) / UNIT) * UNIT`` elements; rank q owns shard q
(the last shards may be short or empty).  ``UNIT`` (4096) is a multiple of every chunk size
(``num_warps * 256`` for 4, 8 or 16 warps), so a chunk never straddles two owners, whatever
the grid or chunk size of this call or of the previous one.

**Buffers** (symmetric region ``ar.lamport2``, allocated once at full size, zero = empty):
[control 4 KiB | RS: 3 slots x W segments x ``cap`` | AG: 3 slots x ``cap``] in 16-bit words,
encoded as in ``all_reduce_lamport`` (``bits ^ 0x8000``, -0.0 -> +0.0 before, so 0 = empty).
RS segment q of slot s of the owner's buffer receives rank q's values of the owner's shard
(at their global offsets); AG slot s of every rank receives the owners' reduced values.

**One call** (slot s from the control block of entry ``pid``):
  1. RS push: every chunk of the input, 128-bit, into segment ``rank`` of slot s of its owner;
  2. clear own slot (s+2)%3 -- what the previous call wrote here: the RS segments of this
     rank's previous shard and the whole previous AG range;
  3. reduce: for each chunk of this rank's shard that this CTA pushed in stage 1 (chunk ``it`` is
     CTA ``it % G``'s in every stage, so a CTA never waits for another CTA of its own rank) poll the
     W RS segments (bounded), sum in fp32 in rank order, cast, and push the result into AG slot s
     of EVERY rank (own included);
  4. gather: poll own AG slot s for every chunk (bounded), decode, write ``out``;
  5. advance the control entries (as ``all_reduce_lamport``).
A timed-out poll records an error (op ``all_reduce``, this rank) and the block skips the rest.

**Why the clears are safe** -- the argument of ``all_reduce_lamport`` carries over because every
chunk's result depends on every rank's stage-1 push: a peer cannot finish its call c+1 (stage 4
waits for the owners, whose stage 3 waits for every rank's stage 1 of call c+1) before this rank
has started call c+1, i.e. finished call c and its clears.  So peers are at most one call ahead
(writing slot (c+1)%3, empty since this rank's call c-1 cleared it), and nothing writes the slot
being cleared.  All CTAs are co-resident (grid <= SMs, SMs / W simulated), and every wait is
for work that peers do before waiting themselves (stage 1 before 3, stage 3 before 4).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tdcompile.kernels import all_reduce_lamport as lam
from tdcompile.kernels.all_reduce import _bases
from tdcompile.kernels.all_reduce_lamport import _advance, _clear, _or, _poll, _push, _state, _sum_words
from tdcompile.kernels.signals import globaltimer, peer_base, record_error
from tdcompile.kernels.symm import Workspace, _Unsupported, phased

REGION = "ar.lamport2"
UNIT = 4096                          # shard granularity (elements): a multiple of every chunk size
WARPS = (4, 8, 16)                   # chunk = num_warps * 256 elements, divides UNIT
NUM_WARPS = 8
DEFAULT_CTAS = 128


@triton.jit
def _poll1(cur, o, m, t0, tmo, BLOCK: tl.constexpr):
    """Volatile 128-bit loads of ``cur + o`` until no word is empty (1, words) or timeout (0, _)."""
    e = tl.zeros([BLOCK], tl.int16)
    ok = 1
    pending = 1
    while pending != 0:
        e = tl.load(cur + o, mask=m, other=1, volatile=True)
        late = (globaltimer() - t0 > tmo).to(tl.int32)
        st = tl.reduce((e == 0).to(tl.int32) | (late * 2), 0, _or)     # CTA-uniform branch
        pending = st & 1
        if pending != 0:
            if (st & 2) != 0:
                pending = 0
                ok = 0
    return ok, e


@triton.jit(do_not_specialize=["n_arg", "n8_arg", "cap8", "err_addr", "err_base", "rank", "timeout_us"])
def _lamport2_kernel(x_ptr, out_ptr, n_arg, n8_arg, tab, ctl_ptr, cap8, err_addr, err_base, rank, timeout_us,
                     WORLD: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr, MAXB: tl.constexpr,
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
    # 1. reduce-scatter push: each chunk into its owner's buffer only
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
    # 4. gather every chunk from own AG slot s
    cur = ag + s * cap
    for it in range(pid, nblk, G):
        if ok != 0:
            o = it * BLOCK + offs
            ok, e = _poll1(cur, o, o < n8, t0, tmo, BLOCK)
            if ok != 0:
                tl.store(out_ptr + o, (e ^ sign).to(dt, bitcast=True), mask=o < n)
    if ok == 0:
        record_error(err_addr, err_base + 6)   # lam.WHAT_LAMPORT: "timed out waiting for a peer"
    # 5. advance the state of every control entry this block stands for
    _advance(ctl_ptr, pid, G, s, n8_arg, MAXB)


# ------------------------------------------------------------------------------ host side
def unsupported_reason(ws: Workspace, x: torch.Tensor) -> str | None:
    return lam.unsupported_reason(ws, x)


def region(ws: Workspace):
    """(region, cap): ``ar.lamport2`` (RS 3 x W segments, then AG 3 segments) at full size."""
    return lam.region(ws, REGION, 3 * (ws.world + 1))


def prepare(ws: Workspace, x: torch.Tensor) -> str | None:
    """``unsupported_reason``; on None the region is allocated (a collective)."""
    reason = unsupported_reason(ws, x)
    if reason is None:
        region(ws)
    return reason


@phased
def all_reduce_lamport2(ws: Workspace, x: torch.Tensor, out: torch.Tensor | None = None,
                        ctas: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``ws`` (module docstring), one barrier-free kernel on the
    current stream.  ``out`` may be ``x``; ``ctas`` (grid) and ``num_warps`` (4, 8 or 16) may
    change from call to call as long as they are the same on every rank."""
    ws.check()
    reason = unsupported_reason(ws, x)
    if reason:
        raise _Unsupported(reason)
    nw = num_warps or NUM_WARPS
    if nw not in WARPS:
        raise ValueError(f"num_warps must be one of {WARPS}, got {nw}")
    reg, cap = region(ws)
    x = x.contiguous()
    out, even, args = lam.launch_args(ws, x, out, reg, cap)
    kw = dict(WORLD=ws.world, EVEN=even, BLOCK=nw * 32 * lam.VEC, MAXB=lam.MAX_CTAS, DOFF=lam.DATA_OFF,
              UNIT=UNIT, num_warps=nw)
    yield from lam.launch(_lamport2_kernel, (lam.grid_size(ws, x.numel(), ctas or DEFAULT_CTAS, nw * 32 * lam.VEC),),
                          args, kw)
    return out
