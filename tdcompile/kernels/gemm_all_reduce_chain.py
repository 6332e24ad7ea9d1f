"""GEMM + all-reduce where cuBLAS does the adds: the partial sums travel along a ring and every
rank adds its own product in the GEMM's epilogue (``fused:chain<L>``).

``fused:ce<C>`` reduces each row chunk with a pull, an add kernel and a second pull after a
barrier; it ends 87-119 us after its GEMMs at W=2 and loses 55-85% at W=4
(``benchmarks/NOTES-first-law.md``, tenth session).  Here no kernel but cuBLAS touches the
data: cuBLAS computes ``C = A @ B + C`` (beta = 1) as cheaply as ``A @ B``, so a rank that
receives a peer's partial sum of a chunk into ``C`` adds its own product for free.

**Schedule.**  The M rows are cut into ``W * L`` chunks; chunk c is *owned* by rank c % W.  Its
partial sum starts at rank c + 1 and visits c + 2, ... , c + W = the owner (ranks mod W), each
adding its product in place.  Rank r, position p = 0 .. W-1 of a chain, level l = 0 .. L-1::

    step (p, l): chunk c = (r - 1 - p) % W + W * l
      p = 0       main: mm(a[c], b) -> stage[l]                     ─ ev ─┐
                  side:                                push to r+1's recv[c] ─ PART[c] -> r+1
      0 < p < W-1 main: wait PART[c] ─ recv[c] += a[c] @ b (cuBLAS) ─ ev ─┐
                  side:                                push to r+1's recv[c] ─ PART[c] -> r+1
      p = W-1     main: wait PART[c] ─ recv[c] += a[c] @ b            ─ ev ─┐
                  side:             push to every peer's recv[c] ─ FINAL[c] -> it ─ recv[c] -> out[c]
                  (the last step copies recv[c] -> out[c] on main instead, beside its final push)
    end           main: per peer chunk, in level order: wait its FINAL ─ recv -> out ─ ... ─ join side

The step that needs rank r-1's push of position p-1 comes L steps after the step that made
it, so with L >= 2 each push hides behind a whole GEMM chunk.  Exposed: the (W-1) L main-stream
waits (a few us each), the last level's final pushes, the copy of the last peers' rows into
``out``.  On 2xH100 (o_proj, M=4096) the end was 69 us after the GEMMs when the own last copy
queued behind the final push and every peer copy waited for all finals (``chain-trace-h100-w2-
20261128.json``): the early finals are now copied while the last ones are in flight.
NVLink bytes per rank: 2 (W-1)/W of the output, as a ring all-reduce.  Every rank ends with the
bits its owners computed, so all ranks hold the same result.  The sum is rounded once per hop
(the epilogue writes bf16/fp16), like a ring all-reduce of bf16 partials; its order is the
chain order, not rank order.

**No SM work on the side stream** (after the entry barrier): a kernel queued there while cuBLAS
holds every SM starts only when that GEMM ends.  The first version signalled with 1-CTA kernels
and pulled the finals behind 1-CTA waits: 342 / 863 us at o_proj / down_proj (2xH200, M=4096),
about 120 / 80 us after the GEMMs.  Flags are therefore written by the copy engine (a 4-byte copy
of the call's device-side epoch, after the data copy in stream order) and every wait runs on the
main stream between GEMMs, when the SMs are free.

**Ordering and buffer reuse.**  recv is the symmetric region ``gemm_all_reduce.chain`` ([M, N]
rows as in the output).  PART and FINAL are epoch flags (``Workspace.bump_epoch
("gemm_all_reduce")``, shared with the other variants of the op, so flags only grow) on pad
channels 4 / 5, word ``c * W + sender``; waits are bounded acquire spins on our own pad.  A copy
publishes its data because the flag copy starts after it completed (stream order) and the
waiter reads the data only after it saw the flag.  A push writes a peer's recv[c] of this call
only after PREV: a barrier of all ranks on the side stream at the call's start, after the side
stream joined the main stream, so every rank's previous call (its GEMMs, pushes and copies out
of recv) has ended.  The in-place GEMM on recv[c] follows the PART wait, hence PREV too.  Plain
products go to a local ``stage``, so nothing writes symmetric memory before PREV.  The main
stream joins the side stream before the op returns.  Every wait is bounded
(``TDCOMPILE_SPIN_TIMEOUT_S``) and recorded as op ``gemm_all_reduce``, this rank; after a recorded
error the later waits do not wait.  Testable on one GPU with simulated ranks
(``tests/gpu/test_gemm_all_reduce_chain.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tdcompile.kernels import signals as sig
from tdcompile.kernels.signals import block_barrier, record_error, wait_geq
from tdcompile.kernels.symm import MAX_WORLD, OPS, PAD_SLOTS, Workspace, _Unsupported, phased
from tdcompile.kernels.tiles import preload

OP_ID = OPS.index("gemm_all_reduce")
PART_CHANNEL, FINAL_CHANNEL = 4, 5       # pad channels, shared with fused:ce (same epoch: flags only grow)
PREV_SLOT = tl.constexpr(PAD_SLOTS - 1)  # the entry barrier's slot on the PART channel
MAX_CHUNKS = PAD_SLOTS - 1               # chunk slots 0 .. MAX_CHUNKS-1 lie below PREV_SLOT
REGION = "gemm_all_reduce.chain"


def schedule(world: int, rank: int, levels: int) -> list[tuple[int, int]]:
    """Rank ``rank``'s steps in order: ``(chunk, position)`` (module docstring)."""
    return [((rank - 1 - p) % world + world * l, p) for p in range(world) for l in range(levels)]


def owner(chunk: int, world: int) -> int:
    return chunk % world


@triton.jit(do_not_specialize=["off", "src", "rank", "err_code", "timeout_us"])
def _chain_wait(pad_tab, off, src, epoch_ptr, err_addr, err_code, rank, timeout_us):
    """Spin until this rank's pad word ``off + src`` holds this call's epoch (bounded)."""
    epoch = tl.load(epoch_ptr)
    dead = tl.load(err_addr.to(tl.pointer_type(tl.int32)), volatile=True) != 0
    tmo = tl.where(dead, 0, timeout_us.to(tl.int64) * 1000)
    own = tl.load(pad_tab + rank).to(tl.pointer_type(tl.int32)) + off + src
    if wait_geq(own, epoch, tmo) == 0:
        record_error(err_addr, err_code)


@triton.jit(do_not_specialize=["rank", "err_code", "timeout_us"])
def _chain_prev(pad_tab, pad_off, epoch_ptr, err_addr, err_code, rank, timeout_us, WORLD: tl.constexpr):
    epoch = tl.load(epoch_ptr)
    dead = tl.load(err_addr.to(tl.pointer_type(tl.int32)), volatile=True) != 0
    tmo = tl.where(dead, 0, timeout_us.to(tl.int64) * 1000)
    if block_barrier(pad_tab, pad_off, PREV_SLOT, rank, epoch, tmo, WORLD) == 0:
        record_error(err_addr, err_code)


def unsupported_reason(ws: Workspace, a: torch.Tensor, b: torch.Tensor, bounds,
                       bias: torch.Tensor | None = None) -> str | None:
    if a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        return f"dtypes {a.dtype}/{b.dtype} (bf16/fp16 only)"
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        return "a [M, K] @ b [K, N] only"
    if bias is not None:     # the reference adds bias on every rank before the sum: not in the chain
        return "bias (the chain adds each rank's product in cuBLAS's epilogue; a bias would be summed W times)"
    if a.shape[0] > ws.max_m:
        return f"M={a.shape[0]} > workspace max M {ws.max_m} (TDCOMPILE_MAX_M)"
    if not bounds or len(bounds) > MAX_CHUNKS or len(bounds) % ws.world:
        return f"{len(bounds or [])} chunks (a multiple of the world size {ws.world}, at most {MAX_CHUNKS})"
    return None


def region(ws: Workspace, n: int, esz: int):
    """The symmetric recv area: ``max_m`` rows of ``n`` (collective on first use)."""
    return ws.region(REGION, ws.max_m * max(n, 8192) * esz)


_WARM: set = set()


def _warm(a, b, bounds):
    """Load cuBLAS's kernels for every chunk shape (plain and beta = 1) before any wait is
    launched: a module load while a spin-wait kernel runs can stall this rank's host."""
    key = (a.dtype, a.device, b.shape, b.stride(), tuple(sorted({hi - lo for lo, hi in bounds})))
    if key in _WARM:
        return
    for rows in sorted({hi - lo for lo, hi in bounds}):
        x = torch.zeros((rows, b.shape[1]), dtype=a.dtype, device=a.device)       # [rows, N]
        torch.mm(a[:rows], b, out=x)
        x.addmm_(a[:rows], b)
    _WARM.add(key)


@phased
def gemm_all_reduce_chain(ws: Workspace, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                          bounds: list[tuple[int, int]], out: torch.Tensor | None = None) -> torch.Tensor:
    """``all_reduce(a @ b)`` ([M, N]: ``out``, or a new tensor) by the chain schedule over row
    chunks ``bounds`` (``W * L`` of them, covering ``[0, M)`` in order; module docstring)."""
    ws.check()
    reason = unsupported_reason(ws, a, b, bounds, bias)
    if reason:
        raise _Unsupported(reason)
    W, r = ws.world, ws.rank
    (M, _), N = a.shape, b.shape[1]
    L = len(bounds) // W
    esz = a.element_size()
    reg = region(ws, N, esz)
    recv = [t[: M * N * esz].view(a.dtype).view(M, N) for t in reg.peers]         # [M, N] per rank
    rows = max(hi - lo for lo, hi in bounds)
    stage = torch.empty((L, rows, N), dtype=a.dtype, device=a.device)            # plain products, local
    if out is None:
        out = torch.empty((M, N), dtype=a.dtype, device=a.device)                 # [M, N]
    elif out.shape != (M, N) or out.dtype != a.dtype or not out.is_contiguous():
        raise ValueError(f"out {tuple(out.shape)} {out.dtype}: want a contiguous [{M}, {N}] {a.dtype}")
    stride = PAD_SLOTS * MAX_WORLD
    part, final = PART_CHANNEL * stride, FINAL_CHANNEL * stride
    pad32 = [t.view(torch.int32) for t in ws.pads.peers]                           # every rank's pad words
    code = sig.error_code(OP_ID, r, sig.WHAT_BARRIER)
    epoch = ws.bump_epoch("gemm_all_reduce")                                      # [1] int32, device
    nxt, peers = (r + 1) % W, [q for q in range(W) if q != r]
    C = len(bounds)
    preload(_chain_prev, (1,), ws.pads.ptrs, part, epoch, ws.err_addr, code, r, ws.timeout_us, WORLD=W, num_warps=1)
    preload(_chain_wait, (1,), ws.pads.ptrs, part, 0, epoch, ws.err_addr, code, r, ws.timeout_us, num_warps=1)
    _warm(a, b, bounds)
    main = torch.cuda.current_stream()
    ws.side.wait_stream(main)          # epoch bumped, inputs ready, this rank's previous call done

    def flag(q, word):                 # on the side stream: the copy engine writes the epoch into q's pad
        pad32[q][word + r: word + r + 1].copy_(epoch)

    yield
    # Simulated ranks step one ``yield`` at a time, in lock-step; every wait below depends only on
    # work that its peers enqueued in an earlier phase.
    with torch.cuda.stream(ws.side):
        _chain_prev[(1,)](ws.pads.ptrs, part, epoch, ws.err_addr, code, r, ws.timeout_us, WORLD=W, num_warps=1)
    yield
    steps = schedule(W, r, L)
    for i, (c, p) in enumerate(steps):
        lo, hi = bounds[c]
        if p == 0:
            dst = stage[c // W, : hi - lo]                                        # [hi-lo, N]
            torch.mm(a[lo:hi], b, out=dst)
        else:
            dst = recv[r][lo:hi]                                                  # [hi-lo, N], holds r-1's sum
            _chain_wait[(1,)](ws.pads.ptrs, part + c * W, (r - 1) % W, epoch, ws.err_addr, code, r,
                              ws.timeout_us, num_warps=1)
            dst.addmm_(a[lo:hi], b)                                               # += own product (beta = 1)
        done = torch.cuda.Event()
        done.record(main)
        last = i == len(steps) - 1
        with torch.cuda.stream(ws.side):                                          # copies only: no SM work
            ws.side.wait_event(done)
            for q in ([nxt] if p < W - 1 else peers):                             # pass the sum on / publish it
                recv[q][lo:hi].copy_(dst)                                         # [hi-lo, N] over NVLink (CE)
                flag(q, (part if p < W - 1 else final) + c * W)
            if p == W - 1 and not last:
                out[lo:hi].copy_(dst)                                             # own rows, beside the next GEMM
        if last:                          # the SMs are free now: not behind the final push, but beside it
            out[lo:hi].copy_(dst)                                                 # [hi-lo, N]
        yield
    for c in sorted((c for c in range(C) if owner(c, W) != r), key=lambda c: c // W):
        lo, hi = bounds[c]                # in level order: the early finals are copied while the last ones fly
        _chain_wait[(1,)](ws.pads.ptrs, final + c * W, owner(c, W), epoch, ws.err_addr, code, r,
                          ws.timeout_us, num_warps=1)
        out[lo:hi].copy_(recv[r][lo:hi])                                          # the peer's rows, pushed to us
    main.wait_stream(ws.side)
    return out
