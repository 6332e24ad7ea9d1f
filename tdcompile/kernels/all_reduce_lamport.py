"""Barrier-free one-shot all-reduce for small (decode) sizes, Lamport style: the data is the flag.

bf16/fp16, any shape, up to ``LAMPORT_MAX_BYTES`` per rank; sums in fp32 in rank order
0..W-1 and casts once, like ``kernels.all_reduce`` (bit-identical on every rank).

**Buffers.**  Symmetric region ``ar.lamport`` = [control (4 KiB) | data], allocated once at full
size (3 x W x ``LAMPORT_MAX_BYTES`` per rank, never grown).  Data: 3 slots x W segments x
``cap`` 16-bit words; segment ``q`` of slot ``s`` of rank r's buffer receives rank q's input of
a call that uses slot ``s``.  Words are stored *encoded*: ``enc = bits(x) ^ 0x8000`` after the
writer replaced -0.0 by +0.0, so ``enc == 0`` (the -0.0 pattern, decoded) never comes from a
real value and means **empty**.  The allocator zero-fills regions, so a fresh region is all
empty (no initialisation kernel; the launcher syncs every rank once after allocation) and
clearing writes zeros.  Consequence: an element that is -0.0 on *every* rank sums to +0.0
(numerically equal; every other sum is bit-identical to the plain fp32 rank-order sum, since
``y + -0.0 == y + +0.0`` unless y = -0.0).
Control (int32, own rank only): ``slot[k]`` (0..2) and ``prev8[k]`` (the previous call's element
count / 8, rounded up) for k < ``MAX_CTAS``.

**One call** (block b of a grid-stride grid, 1024-element chunks; s = ``slot[b]``):
  1. push: load own chunk, encode, 128-bit store into segment ``rank`` of slot s of EVERY
     rank's buffer (own included).  The tail of the last 16-B vector past ``n`` is pushed as
     encoded +0.0, so all peer traffic is 128-bit for any ``n``;
  2. clear: zero own slot (s+2)%3 -- the previous call's slot -- all W segments, first
     ``8*prev8`` elements (overlaps the wait for the peers);
  3. poll own slot s, all W segments of each chunk (``ld.volatile`` 128-bit, L1 bypassed) until
     no word is 0; bounded by ``%globaltimer`` -> ``record_error`` (op ``all_reduce``, this
     rank) and the block skips the rest; then decode, sum in fp32 in rank order, write ``out``;
  4. ``slot[k] = (s+1)%3``, ``prev8[k] = ceil(n/8)`` for k = b, b+G, b+2G, ... < ``MAX_CTAS``.
No barrier, no fence, no atomics.

**Why a peer never writes into the slot being cleared** (all calls of a workspace run in stream
order on each rank, without programmatic dependent launch).  Rank r clears slot (c-1)%3 during its
call c.  Peers write that slot only in call c-1 (r observed every one of those words as
non-empty during its call c-1, so its later zero store is coherence-ordered after them) and in
call c+2.  A peer q starts kernel c+2 only after its kernel c+1 ended (stream order); kernel
c+1 of q waits for rank r's push of call c+1 (chunk 0 exists, ``n >= 1``); r pushes c+1 only
after its kernel c ended, clears included.  So every peer is at most one call ahead (writing
slot (c+1)%3), and slot c%3 is empty when call c starts (its call c-3 words were cleared in
c-2, before r's kernel c-2 ended, hence before any peer's kernel c started).  Ordering of that
clear against the peer's later store: both go to r's own memory, whose L2 is the point of
coherence for local and NVLink stores; kernel completion performs the clear there, and the
peer's store is causally after it (r's next push -> peer observes -> peer's next kernel).
Readers need no acquire: each 16-bit word is single-copy atomic and checked individually
(torn 128-bit NVLink writes are fine), and the values used are the ones the poll loaded.

**Counters.**  The slot index is device state read at kernel start and advanced by the kernel
(nothing from the host in CUDA graphs; stored mod 3, so no wrap problem).  Every block writes
the new state into *all* the slots it stands for (b, b+G, ...), so all ``MAX_CTAS`` entries are
always equal and the grid may differ from call to call (only the union of the chunks matters:
clearing covers all previous chunks whatever the grid); block b reads only entry b, which no
other block of the same kernel writes.  The grid is a pure function of (n, world, ctas,
SM count), hence the same on every rank; it is capped at the SM count (SMs / W for simulated
ranks): a spinning block must never wait for a peer block that cannot be resident.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tdcompile.kernels.all_reduce import _bases, err_base
from tdcompile.kernels.signals import globaltimer, peer_base, record_error
from tdcompile.kernels.symm import OPS, Workspace, _Unsupported, phased

OP_ID = OPS.index("all_reduce")      # errors read "tdist::all_reduce: rank r timed out waiting for a peer"
WHAT_LAMPORT = 6                      # (literal in the kernel) not a barrier: Workspace.check says "a peer"
REGION = "ar.lamport"
LAMPORT_MAX_BYTES = 4 << 20           # per-rank input
CAP = LAMPORT_MAX_BYTES // 2          # elements per segment (multiple of 8)
MAX_CTAS = 128                        # control entries = largest grid (the W=4 sweep reaches 128)
CTL_BYTES = 4096                      # control area (2 * MAX_CTAS int32), page-sized
DATA_OFF = CTL_BYTES // 2             # data area offset in 16-bit words (multiple of 8)
VEC = 8
NUM_WARPS = 8                        # 8 warps x 128 CTAs: 7.5 us at 128x5120, W=2 (64 CTAs: 8.2; 4 warps: 7.6)
BLOCK = NUM_WARPS * 32 * VEC          # elements per chunk: one 16-B vector per thread per segment
DEFAULT_CTAS = 128                    # (all_reduce-h200-w2-2026-11-27-full.json sweep)


# ------------------------------------------------------------------------------ device side
@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _status(e0, e1, e2, e3, e4, e5, e6, e7, late, WORLD: tl.constexpr):
    """CTA-uniform (bit 0: some word still empty, bit 1: some thread saw the deadline pass):
    one OR-reduction, so every thread takes the same branch (threads read %globaltimer at
    slightly different times; a per-thread decision could split the CTA across bar.sync)."""
    emp = (e0 == 0) | (e1 == 0)
    if WORLD > 2:
        emp = emp | (e2 == 0) | (e3 == 0)
    if WORLD > 4:
        emp = emp | (e4 == 0) | (e5 == 0) | (e6 == 0) | (e7 == 0)
    return tl.reduce(emp.to(tl.int32) | (late * 2), 0, _or)


@triton.jit
def _poll(cur, cap, o, m, t0, tmo, BLOCK: tl.constexpr, WORLD: tl.constexpr):
    """Volatile 128-bit loads of segments 0..W-1 of chunk ``o`` of this rank's current slot
    until none is empty (returns 1 and the words) or ``tmo`` ns since ``t0`` (returns 0)."""
    e0 = tl.zeros([BLOCK], tl.int16)
    e1 = e0
    e2 = e0
    e3 = e0
    e4 = e0
    e5 = e0
    e6 = e0
    e7 = e0
    ok = 1
    pending = 1
    while pending != 0:
        e0 = tl.load(cur + o, mask=m, other=1, volatile=True)
        e1 = tl.load(cur + cap + o, mask=m, other=1, volatile=True)
        if WORLD > 2:
            e2 = tl.load(cur + 2 * cap + o, mask=m, other=1, volatile=True)
            e3 = tl.load(cur + 3 * cap + o, mask=m, other=1, volatile=True)
        if WORLD > 4:
            e4 = tl.load(cur + 4 * cap + o, mask=m, other=1, volatile=True)
            e5 = tl.load(cur + 5 * cap + o, mask=m, other=1, volatile=True)
            e6 = tl.load(cur + 6 * cap + o, mask=m, other=1, volatile=True)
            e7 = tl.load(cur + 7 * cap + o, mask=m, other=1, volatile=True)
        late = (globaltimer() - t0 > tmo).to(tl.int32)
        st = _status(e0, e1, e2, e3, e4, e5, e6, e7, late, WORLD)
        pending = st & 1
        if pending != 0:
            if (st & 2) != 0:
                pending = 0
                ok = 0
    return ok, e0, e1, e2, e3, e4, e5, e6, e7


@triton.jit
def _dec(e, sign, dt: tl.constexpr):
    return (e ^ sign).to(dt, bitcast=True).to(tl.float32)


@triton.jit
def _push(b0, b1, b2, b3, b4, b5, b6, b7, o, v, m, sign, WORLD: tl.constexpr):
    """Encode ``v`` (-0.0 -> +0.0, then ``bits ^ 0x8000``) and store it at ``o`` of all W segments."""
    e = v.to(tl.int16, bitcast=True) ^ sign
    e = tl.where(e == 0, sign, e)     # -0.0 -> +0.0: the empty pattern never leaves a writer
    tl.store(b0 + o, e, mask=m)
    tl.store(b1 + o, e, mask=m)
    if WORLD > 2:
        tl.store(b2 + o, e, mask=m)
        tl.store(b3 + o, e, mask=m)
    if WORLD > 4:
        tl.store(b4 + o, e, mask=m)
        tl.store(b5 + o, e, mask=m)
        tl.store(b6 + o, e, mask=m)
        tl.store(b7 + o, e, mask=m)


@triton.jit
def _clear(old, cap, prev, pid, G, BLOCK: tl.constexpr, WORLD: tl.constexpr):
    """Zero (= empty) elements [0, prev) of the W segments at ``old``, grid-stride over blocks."""
    offs = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], tl.int16)
    for it in range(pid, tl.cdiv(prev, BLOCK), G):
        o = it * BLOCK + offs
        for q in tl.static_range(WORLD):
            tl.store(old + q * cap + o, zero, mask=o < prev)


@triton.jit
def _sum_words(e0, e1, e2, e3, e4, e5, e6, e7, sign, dt: tl.constexpr, WORLD: tl.constexpr):
    """fp32 sum of the W decoded segments in rank order 0..W-1."""
    acc = _dec(e0, sign, dt) + _dec(e1, sign, dt)
    if WORLD > 2:
        acc = acc + _dec(e2, sign, dt)
        acc = acc + _dec(e3, sign, dt)
    if WORLD > 4:
        acc = acc + _dec(e4, sign, dt)
        acc = acc + _dec(e5, sign, dt)
        acc = acc + _dec(e6, sign, dt)
        acc = acc + _dec(e7, sign, dt)
    return acc


@triton.jit
def _state(ctl_ptr, pid, MAXB: tl.constexpr):
    """This block's control entry: the slot of this call and the previous call's element count
    (whole 16-B vectors), as ``_advance`` left them."""
    return tl.load(ctl_ptr + pid), tl.load(ctl_ptr + MAXB + pid) * 8


@triton.jit
def _advance(ctl_ptr, pid, G, s, n8_arg, MAXB: tl.constexpr):
    """Next slot and this call's element count into every control entry this block stands for."""
    for k in range(pid, MAXB, G):
        tl.store(ctl_ptr + k, (s + 1) % 3)
        tl.store(ctl_ptr + MAXB + k, n8_arg)


@triton.jit(do_not_specialize=["n_arg", "n8_arg", "cap8", "err_addr", "err_base", "rank", "timeout_us"])
def _lamport_kernel(x_ptr, out_ptr, n_arg, n8_arg, tab, ctl_ptr, cap8, err_addr, err_base, rank, timeout_us,
                    WORLD: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr, MAXB: tl.constexpr,
                    DOFF: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    dt = out_ptr.dtype.element_ty
    n8 = n8_arg * 8                       # peer traffic: provably whole 16-B vectors
    if EVEN:
        n = n8
    else:
        n = n_arg                         # x / out only
    cap = cap8 * 8
    s, prev = _state(ctl_ptr, pid, MAXB)
    offs = tl.arange(0, BLOCK)
    sign = tl.full([BLOCK], -32768, tl.int16)
    nblk = tl.cdiv(n8, BLOCK)
    # 1. push: segment `rank` of slot s of every rank's buffer
    b0, b1, b2, b3, b4, b5, b6, b7 = _bases(tab, DOFF + (s * WORLD + rank) * cap, tl.int16, WORLD)
    for it in range(pid, nblk, G):
        o = it * BLOCK + offs
        _push(b0, b1, b2, b3, b4, b5, b6, b7, o, tl.load(x_ptr + o, mask=o < n, other=0.0), o < n8, sign, WORLD)
    # 2. clear own previous slot (no peer writes it before this kernel ends; see docstring)
    own = peer_base(tab, rank, tl.int16) + DOFF
    _clear(own + ((s + 2) % 3) * WORLD * cap, cap, prev, pid, G, BLOCK, WORLD)
    # 3. wait for all W segments of each chunk, reduce in rank order
    cur = own + s * WORLD * cap
    tmo = timeout_us.to(tl.int64) * 1000
    t0 = globaltimer()
    ok = 1
    for it in range(pid, nblk, G):
        if ok != 0:
            o = it * BLOCK + offs
            ok, e0, e1, e2, e3, e4, e5, e6, e7 = _poll(cur, cap, o, o < n8, t0, tmo, BLOCK, WORLD)
            if ok != 0:
                acc = _sum_words(e0, e1, e2, e3, e4, e5, e6, e7, sign, dt, WORLD)
                tl.store(out_ptr + o, acc.to(dt), mask=o < n)
    if ok == 0:
        record_error(err_addr, err_base + 6)   # WHAT_LAMPORT
    # 4. advance the state of every control entry this block stands for
    _advance(ctl_ptr, pid, G, s, n8_arg, MAXB)


# ------------------------------------------------------------------------------ host side
def unsupported_reason(ws: Workspace, x: torch.Tensor) -> str | None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {x.dtype} (lamport all-reduce takes bf16/fp16)"
    if x.dim() == 0 or x.numel() == 0:
        return "empty or 0-d input"
    if x.numel() * x.element_size() > LAMPORT_MAX_BYTES:
        return f"{x.numel() * x.element_size()} bytes > LAMPORT_MAX_BYTES ({LAMPORT_MAX_BYTES})"
    return None


def prepare(ws: Workspace, x: torch.Tensor) -> str | None:
    """Why ``x`` cannot be all-reduced here, else None with the region allocated (a collective:
    every rank calls it at the same point, e.g. inside ``ops.cuda.ready``)."""
    reason = unsupported_reason(ws, x)
    if reason is None:
        region(ws)
    return reason


def region(ws: Workspace, name: str = REGION, segments: int | None = None):
    """(region, cap): a Lamport region at full capacity (allocated once, collectively, on first
    use) and its segment capacity in elements (``LAMPORT_MAX_BYTES // 2``): the control area,
    then ``segments`` data segments (default 3 slots x W, this kernel's).  No growth: growing
    between back-to-back calls would need a host sync while peers' kernels wait."""
    prev = ws.regions.get(name)
    prev_ptr = prev.local.data_ptr() if prev is not None else None
    reg = ws.region(name, CTL_BYTES + (3 * ws.world if segments is None else segments) * CAP * 2)
    if reg.local.data_ptr() != prev_ptr:  # fresh zero-filled copy on every rank: empty, state 0
        if ws.sim is None:                # no peer pushes before every rank's zero-fill is done
            ws.backend.barrier()
        else:
            torch.cuda.synchronize()
    return reg, CAP


def launch_args(ws: Workspace, x: torch.Tensor, out: torch.Tensor | None, reg, cap: int):
    """``(out, even, args)``: the output (allocated, or checked), whether the element count is a
    multiple of 8, and the leading kernel arguments shared by the one- and two-shot kernels
    (``x, out, n_arg, n8_arg, tab, ctl_ptr, cap8, err_addr, err_base, rank, timeout_us``)."""
    n = x.numel()
    if out is None:
        out = torch.empty_like(x)
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {tuple(x.shape)} {x.dtype}")
    even = n % VEC == 0
    n8 = triton.cdiv(n, VEC)
    ctl = reg.local[:CTL_BYTES].view(torch.int32)
    return out, even, (x, out, n8 if even else n, n8, reg.ptrs, ctl, cap // VEC, ws.err_addr,
                       err_base(OP_ID, ws.rank), ws.rank, ws.timeout_us)


def launch(kernel, grid, args, kw):
    """Generator for a ``phased`` launcher: compile + load both EVEN variants (so that a later
    size change loads no module while this rank's previous kernel spins, simulated ranks), yield
    to the peers, then launch."""
    from tdcompile.kernels.tiles import preload
    for ev in (kw["EVEN"], not kw["EVEN"]):
        preload(kernel, grid, *args, **{**kw, "EVEN": ev})
    yield
    kernel[grid](*args, **kw)


def grid_size(ws: Workspace, n: int, ctas: int | None = None, block: int = BLOCK) -> int:
    """Pure function of (n, world, ctas, block, SM count, simulated or not): same on every rank."""
    from tdcompile.kernels.tiles import num_sms
    limit = num_sms() if ws.sim is None else max(1, num_sms() // ws.world)
    return max(1, min(triton.cdiv(n, block), ctas or DEFAULT_CTAS, limit, MAX_CTAS))


@phased
def all_reduce_lamport(ws: Workspace, x: torch.Tensor, out: torch.Tensor | None = None,
                       ctas: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``ws`` (bf16/fp16, any shape, at most
    ``LAMPORT_MAX_BYTES``), one barrier-free kernel on the current stream.  ``out`` may be
    ``x`` (in place); ``ctas``: grid size (default ``DEFAULT_CTAS``, capped by the work), may
    differ from call to call as long as it is the same on every rank; so may ``num_warps``
    (default ``NUM_WARPS``; the chunk is ``num_warps * 256`` elements)."""
    ws.check()
    reason = unsupported_reason(ws, x)
    if reason:
        raise _Unsupported(reason)
    reg, cap = region(ws)
    x = x.contiguous()
    out, even, args = launch_args(ws, x, out, reg, cap)
    nw = num_warps or NUM_WARPS           # chunk = one 16-B vector per thread per segment
    kw = dict(WORLD=ws.world, EVEN=even, BLOCK=nw * 32 * VEC, MAXB=MAX_CTAS, DOFF=DATA_OFF, num_warps=nw)
    yield from launch(_lamport_kernel, (grid_size(ws, x.numel(), ctas, nw * 32 * VEC),), args, kw)
    return out
