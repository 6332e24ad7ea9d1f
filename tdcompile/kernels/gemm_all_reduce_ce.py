"""GEMM + all-reduce with the bytes on the copy engine (the ``fused:ce<C>`` variants).

The SM-based schedules lose at prefill sizes because the all-reduce competes with cuBLAS for
SMs (``benchmarks/NOTES-prefill-overlap.md``).  Here cuBLAS keeps the SMs: per row chunk i of
the output (C chunks, bounds given by the caller) ::

    main:  mm[i] -> symmetric data area (zero copy) ─ event ──────────────────────────────
    side:        ╰ wait event ─ READY barrier[i] ─ CE pull my row slice of chunk i from every
                   rank into ``stage`` ─ add (W slices, fp32, rank order) -> out, res area
                   ─ REDUCED barrier[i] ─ CE pull every other rank's reduced slice -> out

Only the 1-CTA barriers and the add kernel (memory bound, 1/W of the chunk) use SMs; the
NVLink bytes (2 (W-1)/W of the output, like a two-shot all-reduce) move by ``copy_`` between
the local views of peers' symmetric buffers (D2D memcpy: copy engine).

**Ordering.**  Barriers are ``signals.block_barrier`` (release store of the call's epoch into
every peer's pad, bounded acquire spin on our own) on pad channels ``READY_CHANNEL`` /
``REDUCED_CHANNEL``, slot = chunk index, epoch = ``Workspace.bump_epoch("gemm_all_reduce")``
(device counter, advanced on the main stream: graph-safe).  READY[i] follows this rank's
``mm[i]`` (stream order through the event), so after it every rank's chunk i is in place.
REDUCED[i] follows this rank's pulls of chunk i and its add, so after it every reduced slice
of chunk i is in place *and no peer reads our data chunk i any more*.

**Buffer reuse** (back-to-back calls, graph replays).  Data chunk i is rewritten by the next
call's ``mm[i]``; every peer finished reading it before REDUCED[i] of this call, which this
rank passed before its call ended (main joins side).  Our res slice of chunk i is read by
peers after REDUCED[i] of this call and rewritten by our add of the next call, after READY[i]
of the next call, which a peer reaches only after its own previous call ended (its side stream
joined before its next ``mm[i]``).  The ``stage`` buffer is local and used in side-stream order.

Every wait is bounded (``TDCOMPILE_SPIN_TIMEOUT_S``); a timeout is recorded in the error word
(op ``gemm_all_reduce``, this rank) and raised by ``Workspace.check``.  Testable on one GPU with
simulated ranks (their D2D copies then run as kernels, same results).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tdcompile.kernels import signals as sig
from tdcompile.kernels.signals import block_barrier, record_error
from tdcompile.kernels.symm import MAX_WORLD, OPS, PAD_SLOTS, Workspace, _Unsupported, phased
from tdcompile.kernels.tiles import preload

OP_ID = OPS.index("gemm_all_reduce")
READY_CHANNEL, REDUCED_CHANNEL = 4, 5          # pad channels (symm.PAD_CHANNELS)
DATA_REGION, RES_REGION = "ce.data", "ce.res"
MAX_CHUNKS = PAD_SLOTS
ADD_BLOCK = 4096


@triton.jit(do_not_specialize=["slot", "rank", "err_code", "timeout_us"])
def _ce_barrier(pad_tab, pad_off, slot, epoch_ptr, err_addr, err_code, rank, timeout_us, WORLD: tl.constexpr):
    epoch = tl.load(epoch_ptr)
    # a peer already timed out (error word set): do not wait a full timeout at every later barrier
    dead = tl.load(err_addr.to(tl.pointer_type(tl.int32)), volatile=True) != 0
    tmo = tl.where(dead, 0, timeout_us.to(tl.int64) * 1000)
    ok = block_barrier(pad_tab, pad_off, slot, rank, epoch, tmo, WORLD)
    if ok == 0:
        record_error(err_addr, err_code)


@triton.jit(do_not_specialize=["n_arg", "stride8"])
def _ce_add(stage_ptr, out_ptr, res_ptr, n_arg, stride8, WORLD: tl.constexpr, EVEN: tl.constexpr,
            BLOCK: tl.constexpr):
    """out = res = sum over q of stage[q, :n], fp32 in rank order, one cast.  ``EVEN``: ``n_arg``
    is n / 8, so masks are constant per 16-byte vector (128-bit accesses)."""
    if EVEN:
        n = n_arg * 8
    else:
        n = n_arg
    stride = stride8 * 8
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    acc = tl.load(stage_ptr + o, mask=m, other=0.0).to(tl.float32)
    for q in tl.static_range(1, WORLD):
        acc += tl.load(stage_ptr + q * stride + o, mask=m, other=0.0).to(tl.float32)
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + o, y, mask=m)
    tl.store(res_ptr + o, y, mask=m)


def row_slices(lo: int, hi: int, world: int) -> list[tuple[int, int]]:
    """Rank p reduces rows ``[lo + p*q, lo + (p+1)*q)`` of chunk ``[lo, hi)`` (q = ceil/W; the
    last slices may be short or empty)."""
    q = -(-(hi - lo) // world)
    return [(min(lo + p * q, hi), min(lo + (p + 1) * q, hi)) for p in range(world)]


def unsupported_reason(ws: Workspace, a: torch.Tensor, b: torch.Tensor, bounds,
                       bias: torch.Tensor | None = None, sm_carveout: int = 0) -> str | None:
    if a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        return f"dtypes {a.dtype}/{b.dtype} (bf16/fp16 only)"
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        return "a [M, K] @ b [K, N] only"
    if bias is not None and (bias.shape != (b.shape[1],) or bias.dtype != a.dtype):
        return f"bias {tuple(bias.shape)} {bias.dtype} (want [N] of a's dtype)"
    if b.shape[1] % 8:      # rows of 16-B multiples: one add-kernel specialisation, 128-bit accesses
        return f"N={b.shape[1]} is not a multiple of 8"
    if a.shape[0] > ws.max_m:
        return f"M={a.shape[0]} > workspace max M {ws.max_m} (TDCOMPILE_MAX_M)"
    if not bounds or len(bounds) > MAX_CHUNKS:
        return f"{len(bounds or [])} chunks (1..{MAX_CHUNKS})"
    if sm_carveout and not hasattr(torch._C, "_set_sm_carveout_experimental"):
        return f"SM carveout {sm_carveout}: this torch has no torch._C._set_sm_carveout_experimental"
    return None


def regions(ws: Workspace, n: int, esz: int):
    """(data, res): the symmetric areas, ``max_m`` rows of ``n`` each (collective on first use)."""
    nbytes = ws.max_m * max(n, 8192) * esz
    return ws.region(DATA_REGION, nbytes), ws.region(RES_REGION, nbytes)


def _gemm(a, b, bias, out, sm_carveout: int = 0):
    """cuBLAS into ``out``; ``sm_carveout`` > 0: the GEMM leaves that many SMs free for the
    schedule's barrier and add kernels on the side stream: torch's SM carveout, which its cuBLASLt
    path honours (so that backend is preferred for the call). Both are process-wide settings, set
    for this call only and restored before returning."""
    if not sm_carveout:
        return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)
    before, backend = torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library()
    torch._C._set_sm_carveout_experimental(sm_carveout)
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)
    finally:
        torch.backends.cuda.preferred_blas_library(backend)
        torch._C._set_sm_carveout_experimental(before)


@phased
def gemm_all_reduce_ce(ws: Workspace, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                       bounds: list[tuple[int, int]], out: torch.Tensor | None = None,
                       sm_carveout: int = 0) -> torch.Tensor:
    """``all_reduce(a @ b + bias)`` ([M, N]: ``out``, or a new tensor) with chunk i's reduction on
    the copy engine overlapping chunk i+1's GEMM; ``bounds``: the row chunks (cover ``[0, M)`` in
    order); ``sm_carveout``: SMs the chunk GEMMs leave free (``_gemm``)."""
    ws.check()
    reason = unsupported_reason(ws, a, b, bounds, bias, sm_carveout)
    if reason:
        raise _Unsupported(reason)
    W, r = ws.world, ws.rank
    (M, _), N = a.shape, b.shape[1]
    esz = a.element_size()
    data, res = regions(ws, N, esz)
    dview = [t[: M * N * esz].view(a.dtype).view(M, N) for t in data.peers]     # [M, N] per rank
    rview = [t[: M * N * esz].view(a.dtype).view(M, N) for t in res.peers]      # [M, N] per rank
    own = data.local[: M * N * esz].view(a.dtype).view(M, N)
    slices = [row_slices(lo, hi, W) for lo, hi in bounds]
    q = max(hi - lo for s in slices for lo, hi in s)
    per = -(-max(q, 1) * N // 8) * 8                                              # 16-B aligned rows of stage
    stage = torch.empty((W, per), dtype=a.dtype, device=a.device)                 # [W, >= q*N]
    if out is None:
        out = torch.empty((M, N), dtype=a.dtype, device=a.device)                 # [M, N]
    elif out.shape != (M, N) or out.dtype != a.dtype or not out.is_contiguous():
        raise ValueError(f"out {tuple(out.shape)} {out.dtype}: want a contiguous [{M}, {N}] {a.dtype}")
    pad_stride = PAD_SLOTS * MAX_WORLD
    code = sig.error_code(OP_ID, r, sig.WHAT_BARRIER)
    epoch = ws.bump_epoch("gemm_all_reduce")
    bar = (ws.pads.ptrs, READY_CHANNEL * pad_stride, 0, epoch, ws.err_addr, code, r, ws.timeout_us)
    preload(_ce_barrier, (1,), *bar, WORLD=W, num_warps=1)
    add_kw = dict(WORLD=W, EVEN=True, BLOCK=ADD_BLOCK, num_warps=8)   # N % 8 == 0: slices 16-B aligned
    preload(_ce_add, (1,), stage, out, out, 1, per // 8, **add_kw)
    main = torch.cuda.current_stream()
    ws.side.wait_stream(main)          # epoch bumped, inputs ready, earlier collectives done
    yield
    # Simulated ranks step one ``yield`` at a time, in lock-step: every waiting kernel (the
    # barriers) is launched by all ranks before any rank enqueues a copy (SimWorld.run's rule).
    for i, (lo, hi) in enumerate(bounds):
        _gemm(a[lo:hi], b, bias, own[lo:hi], sm_carveout)         # [hi-lo, N] into the symmetric area
        done = torch.cuda.Event()
        done.record(main)
        s0, s1 = slices[i][r]
        n = (s1 - s0) * N
        with torch.cuda.stream(ws.side):
            ws.side.wait_event(done)
            _ce_barrier[(1,)](ws.pads.ptrs, READY_CHANNEL * pad_stride, i, epoch, ws.err_addr, code, r,
                              ws.timeout_us, WORLD=W, num_warps=1)
        yield
        with torch.cuda.stream(ws.side):
            for p in range(W):                                    # my rows of chunk i, every rank's partial
                stage[p, :n].view(s1 - s0, N).copy_(dview[p][s0:s1])   # [s1-s0, N] over NVLink (CE)
            if n:
                _ce_add[(triton.cdiv(n, ADD_BLOCK),)](stage, out[s0:s1], rview[r][s0:s1], n // 8, per // 8,
                                                      **add_kw)
        yield
        with torch.cuda.stream(ws.side):
            _ce_barrier[(1,)](ws.pads.ptrs, REDUCED_CHANNEL * pad_stride, i, epoch, ws.err_addr, code, r,
                              ws.timeout_us, WORLD=W, num_warps=1)
        yield
        with torch.cuda.stream(ws.side):
            for p in range(W):                                    # every other rank's reduced rows
                p0, p1 = slices[i][p]
                if p != r and p1 > p0:
                    out[p0:p1].copy_(rview[p][p0:p1])             # [p1-p0, N] over NVLink (CE)
        yield
    main.wait_stream(ws.side)
    return out
