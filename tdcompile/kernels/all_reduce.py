"""All-reduce over symmetric memory, P2P loads/stores only (no multicast), bf16/fp16.

Two variants (``variant=``), both summing in fp32 in rank order 0..W-1 and casting once, so
every rank (and both variants) produce bit-identical results:

* ``one_shot``: [copy-in] -> entry barrier -> every rank pulls its chunks from all W input
  areas, sums, writes ``out`` -> exit barrier.  NVLink bytes per rank: (W-1)*S.
* ``two_shot``: [copy-in] -> entry barrier -> reduce-scatter (rank r reduces sub-chunk r of
  every chunk from all W input areas, writes it once into its own ``res`` area and into
  ``out``) -> middle barrier -> all-gather (rank r pulls sub-chunk s from rank s's ``res``
  into ``out``).  NVLink bytes per rank: 2*(W-1)/W*S.

Hardware pace: 128-bit accesses (peer bases are declared 16-byte aligned with
``tl.multiple_of``; the element count is passed as a multiple of 8 so masks are constant
per 16-byte vector), all W loads of a vector issued before the first add, a grid of tens
of CTAs (``ctas=``, chosen by measurement; the kernel loops grid-stride over chunks).

**Barriers** (``signals.flag_barrier``, vLLM custom-all-reduce style): per-block flags
``sig[b*8 + src]`` in a symmetric region; threads 0..W-1 of block b store (``st.release.sys``)
the block's epoch into peer t's slot and spin (``ld.acquire.sys``, bounded by
``TDCOMPILE_SPIN_TIMEOUT_S``) on their own slot, then ``bar.red`` joins the CTA.  The epoch
is a **device-side per-block counter** (``cnt[b]``, read at kernel start, advanced by the
kernel itself at exit): no epoch kernel before the op, no host counter baked into CUDA
graphs, no flag resets (``>=`` compare, wrap-safe; a peer is never more than one barrier
ahead).  The grid may change from call to call: slot b's counter counts the barriers
block b took part in, which is the same on every rank because every rank launches the
same grid for the same call.

**Zero copy and buffer lifetime.**  ``symm_input(ws, shape, dtype)`` returns a view of this
rank's symmetric input area; a producer (``torch.mm(..., out=view)``) writes it and
``all_reduce(ws, view)`` skips the copy-in.  The producer runs *before* this call's entry
barrier, so the area must be free when this rank's previous all-reduce kernel ends.  The
pattern used is **release/acquire "done reading" before exit** (no double buffering, which
would need the parity of the call known on the host -- wrong under CUDA-graph replays of
an odd number of calls): invariant *when any all-reduce kernel of rank r ends, every peer
has finished all its reads of r's input area for that call*.
  - one_shot: the exit barrier (each block signals after its last peer read; release
    orders the reads before the signal) gives it directly;
  - two_shot: the middle barrier gives it (input areas are only read in the reduce-scatter
    phase); the ``res`` area, read by peers in the all-gather phase, is only rewritten by
    a later two-shot call *after its entry barrier*, which a peer passes only once its
    previous kernel finished (stream order): so two-shot needs no exit barrier.
Per-block barriers imply the global statement because a rank's next kernel starts only
after all its blocks finished.  The copy-in path relies on the same invariant.  The same
regions, flags and counters are shared by ``all_reduce_rmsnorm`` (same invariants).

Workspace: region ``ar.data`` = [input area | res area], each ``max(max_m*max(N, 8192), n)``
elements (sized generously so a view from ``symm_input`` is not invalidated by growth;
growth is collective and refused during capture), region ``ar.sig`` = flags + counters.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tdcompile.kernels import signals as sig
from tdcompile.kernels.signals import flag_barrier, peer_base, record_error
from tdcompile.kernels.symm import OPS, Workspace, _Unsupported, phased

OP_ID = OPS.index("all_reduce")
VEC = 8                      # 2-byte elements per 128-bit access
MAX_CTAS = 256               # flag slots per rank = largest grid
SLOT_STRIDE = 8              # flags per block slot (MAX_WORLD int32 = one 32-B sector)
DATA_REGION = "ar.data"
SIG_REGION = "ar.sig"
VARIANTS = ("one_shot", "two_shot")
NUM_WARPS = 16
DEFAULT_CTAS = 128             # 2xH200, 4096x5120: one-shot 155.5 vs 165.6 us (copy-in), 132.0 vs
                               # 133.6 (zero copy); two-shot 163.5 vs 184.3 (all_reduce-h200-w2-2026-11-27-full.json)
# placeholder crossover until measured (bytes up to which one_shot is picked by "auto")
ONE_SHOT_MAX_BYTES = {2: 1 << 62, 4: 512 << 10, 8: 256 << 10}


# ------------------------------------------------------------------------------ device helpers
@triton.jit
def _bases(tab, off, dt: tl.constexpr, WORLD: tl.constexpr):
    """The W peers' typed, 16-B aligned base pointers (+ ``off`` elements); unused slots
    repeat rank 0's base (never dereferenced)."""
    b0 = peer_base(tab, 0, dt) + off
    b1 = peer_base(tab, 1, dt) + off
    b2 = b0
    b3 = b0
    b4 = b0
    b5 = b0
    b6 = b0
    b7 = b0
    if WORLD > 2:
        b2 = peer_base(tab, 2, dt) + off
        b3 = peer_base(tab, 3, dt) + off
    if WORLD > 4:
        b4 = peer_base(tab, 4, dt) + off
        b5 = peer_base(tab, 5, dt) + off
        b6 = peer_base(tab, 6, dt) + off
        b7 = peer_base(tab, 7, dt) + off
    return b0, b1, b2, b3, b4, b5, b6, b7


@triton.jit
def _sum_ranks(b0, b1, b2, b3, b4, b5, b6, b7, o, m, WORLD: tl.constexpr):
    """fp32 sum over ranks of ``b_r[o]``: all W loads issued first, then the adds in rank
    order 0..W-1 (bit-identical on every rank)."""
    v0 = tl.load(b0 + o, mask=m, other=0.0, cache_modifier=".cg")
    v1 = tl.load(b1 + o, mask=m, other=0.0, cache_modifier=".cg")
    v2 = v0
    v3 = v0
    v4 = v0
    v5 = v0
    v6 = v0
    v7 = v0
    if WORLD > 2:
        v2 = tl.load(b2 + o, mask=m, other=0.0, cache_modifier=".cg")
        v3 = tl.load(b3 + o, mask=m, other=0.0, cache_modifier=".cg")
    if WORLD > 4:
        v4 = tl.load(b4 + o, mask=m, other=0.0, cache_modifier=".cg")
        v5 = tl.load(b5 + o, mask=m, other=0.0, cache_modifier=".cg")
        v6 = tl.load(b6 + o, mask=m, other=0.0, cache_modifier=".cg")
        v7 = tl.load(b7 + o, mask=m, other=0.0, cache_modifier=".cg")
    acc = v0.to(tl.float32) + v1.to(tl.float32)
    if WORLD > 2:
        acc = acc + v2.to(tl.float32)
        acc = acc + v3.to(tl.float32)
    if WORLD > 4:
        acc = acc + v4.to(tl.float32)
        acc = acc + v5.to(tl.float32)
        acc = acc + v6.to(tl.float32)
        acc = acc + v7.to(tl.float32)
    return acc


@triton.jit
def _barrier(sig_tab, my_sig, pid, rank, value, tmo, WORLD: tl.constexpr):
    return flag_barrier(sig_tab, my_sig, pid * 8, rank, value, tmo, rank * 0 + WORLD)


@triton.jit(do_not_specialize=["n_arg", "err_addr", "err_base", "rank", "timeout_us"])
def _one_shot_kernel(x_ptr, out_ptr, n_arg, buf_tab, sig_tab, my_sig, cnt_ptr, err_addr, err_base, rank,
                     timeout_us, WORLD: tl.constexpr, COPY_IN: tl.constexpr, EVEN: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    dt = out_ptr.dtype.element_ty
    if EVEN:
        n = n_arg * 8                     # provably a multiple of 8: masks constant per 16 B
    else:
        n = n_arg
    tmo = timeout_us.to(tl.int64) * 1000
    c = tl.load(cnt_ptr + pid)
    b0, b1, b2, b3, b4, b5, b6, b7 = _bases(buf_tab, 0, dt, WORLD)
    nblk = tl.cdiv(n, BLOCK)
    offs = tl.arange(0, BLOCK)
    if COPY_IN:
        mine = peer_base(buf_tab, rank, dt)
        for it in range(pid, nblk, G):
            o = it * BLOCK + offs
            m = o < n
            tl.store(mine + o, tl.load(x_ptr + o, mask=m), mask=m)
    ok = _barrier(sig_tab, my_sig, pid, rank, c + 1, tmo, WORLD)
    if ok != 0:
        for it in range(pid, nblk, G):
            o = it * BLOCK + offs
            m = o < n
            acc = _sum_ranks(b0, b1, b2, b3, b4, b5, b6, b7, o, m, WORLD)
            tl.store(out_ptr + o, acc.to(dt), mask=m)
    else:
        record_error(err_addr, err_base + sig.WHAT_BARRIER)
    ok2 = _barrier(sig_tab, my_sig, pid, rank, c + 2, tmo * ok, WORLD)
    if ok2 == 0:
        if ok != 0:
            record_error(err_addr, err_base + sig.WHAT_EXIT_BARRIER)
    tl.store(cnt_ptr + pid, c + 2)


@triton.jit(do_not_specialize=["n_arg", "res8", "err_addr", "err_base", "rank", "timeout_us"])
def _two_shot_kernel(x_ptr, out_ptr, n_arg, res8, buf_tab, sig_tab, my_sig, cnt_ptr, err_addr, err_base, rank,
                     timeout_us, WORLD: tl.constexpr, COPY_IN: tl.constexpr, EVEN: tl.constexpr,
                     SUB: tl.constexpr):
    BLOCK: tl.constexpr = SUB * WORLD
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    dt = out_ptr.dtype.element_ty
    if EVEN:
        n = n_arg * 8
    else:
        n = n_arg
    res = res8 * 8                         # element offset of the res area (multiple of 8)
    tmo = timeout_us.to(tl.int64) * 1000
    c = tl.load(cnt_ptr + pid)
    mine = peer_base(buf_tab, rank, dt)
    b0, b1, b2, b3, b4, b5, b6, b7 = _bases(buf_tab, 0, dt, WORLD)
    nblk = tl.cdiv(n, BLOCK)
    so = tl.arange(0, SUB)
    if COPY_IN:
        for it in range(pid, nblk, G):
            for s in tl.static_range(WORLD):
                o = it * BLOCK + s * SUB + so
                m = o < n
                tl.store(mine + o, tl.load(x_ptr + o, mask=m), mask=m)
    ok = _barrier(sig_tab, my_sig, pid, rank, c + 1, tmo, WORLD)
    if ok != 0:                            # reduce-scatter: sub-chunk `rank` of every chunk
        for it in range(pid, nblk, G):
            o = it * BLOCK + rank * SUB + so
            m = o < n
            v = _sum_ranks(b0, b1, b2, b3, b4, b5, b6, b7, o, m, WORLD).to(dt)
            tl.store(mine + res + o, v, mask=m)
            tl.store(out_ptr + o, v, mask=m)
    else:
        record_error(err_addr, err_base + sig.WHAT_BARRIER)
    ok2 = _barrier(sig_tab, my_sig, pid, rank, c + 2, tmo * ok, WORLD)
    if ok2 != 0:                           # all-gather: sub-chunk s from rank s's res area
        for it in range(pid, nblk, G):
            base = it * BLOCK + so
            _gather(b0, b1, b2, b3, b4, b5, b6, b7, out_ptr, res, base, n, rank, SUB, WORLD)
    else:
        if ok != 0:
            record_error(err_addr, err_base + sig.WHAT_MID_BARRIER)
    tl.store(cnt_ptr + pid, c + 2)


@triton.jit
def _gather(b0, b1, b2, b3, b4, b5, b6, b7, out_ptr, res, base, n, rank, SUB: tl.constexpr, WORLD: tl.constexpr):
    """out[base + s*SUB + i] = res_s[...] for every s != rank: all loads, then all stores."""
    o0 = base
    o1 = base + SUB
    m0 = (o0 < n) & (rank != 0)
    m1 = (o1 < n) & (rank != 1)
    u0 = tl.load(b0 + res + o0, mask=m0, cache_modifier=".cg")
    u1 = tl.load(b1 + res + o1, mask=m1, cache_modifier=".cg")
    if WORLD > 2:
        o2 = base + 2 * SUB
        o3 = base + 3 * SUB
        m2 = (o2 < n) & (rank != 2)
        m3 = (o3 < n) & (rank != 3)
        u2 = tl.load(b2 + res + o2, mask=m2, cache_modifier=".cg")
        u3 = tl.load(b3 + res + o3, mask=m3, cache_modifier=".cg")
    if WORLD > 4:
        o4 = base + 4 * SUB
        o5 = base + 5 * SUB
        o6 = base + 6 * SUB
        o7 = base + 7 * SUB
        m4 = (o4 < n) & (rank != 4)
        m5 = (o5 < n) & (rank != 5)
        m6 = (o6 < n) & (rank != 6)
        m7 = (o7 < n) & (rank != 7)
        u4 = tl.load(b4 + res + o4, mask=m4, cache_modifier=".cg")
        u5 = tl.load(b5 + res + o5, mask=m5, cache_modifier=".cg")
        u6 = tl.load(b6 + res + o6, mask=m6, cache_modifier=".cg")
        u7 = tl.load(b7 + res + o7, mask=m7, cache_modifier=".cg")
    tl.store(out_ptr + o0, u0, mask=m0)
    tl.store(out_ptr + o1, u1, mask=m1)
    if WORLD > 2:
        tl.store(out_ptr + o2, u2, mask=m2)
        tl.store(out_ptr + o3, u3, mask=m3)
    if WORLD > 4:
        tl.store(out_ptr + o4, u4, mask=m4)
        tl.store(out_ptr + o5, u5, mask=m5)
        tl.store(out_ptr + o6, u6, mask=m6)
        tl.store(out_ptr + o7, u7, mask=m7)


# ------------------------------------------------------------------------------ host side
def regions(ws: Workspace, hidden: int, numel: int):
    """(data, sig, cap): the shared all-reduce regions (collective, same order on every rank)
    and the capacity of the input area in elements (the res area starts at ``cap``)."""
    want = 2 * max(ws.max_m * max(hidden, 8192), numel) * 2
    data = ws.region(DATA_REGION, want)
    sigr = ws.region(SIG_REGION, (MAX_CTAS * SLOT_STRIDE + MAX_CTAS) * 4)
    cap = data.nbytes // 4               # 2-byte elements per half; multiple of 1024
    return data, sigr, cap


def symm_input(ws: Workspace, shape, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous ``shape``/``dtype`` view at the start of this rank's symmetric input area.

    Write it (e.g. ``torch.mm(a, b, out=view)``) on the stream that will call
    ``all_reduce(ws, view)`` / ``all_reduce_rmsnorm(ws, view, ...)``: that call then reads it
    in place (no copy-in).  Valid until the region grows (a later call with more than
    ``max(TDCOMPILE_MAX_M * max(N, 8192), numel)`` elements; never during capture).  Every
    call to this function returns the same memory: one outstanding producer at a time, and
    the view must not be used as the ``out`` of the all-reduce.  Collective on first use
    (allocates the regions on every rank)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"symm_input: dtype {dtype} (bf16/fp16 only)")
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    data, _, cap = regions(ws, shape[-1] if shape else 1, numel)
    if numel > cap:
        raise _Unsupported(f"symm_input: {numel} elements > all-reduce input area ({cap})")
    return data.local[: numel * 2].view(dtype).view(shape)


def _overlaps(t: torch.Tensor, data) -> bool:
    lo, hi = data.local.data_ptr(), data.local.data_ptr() + data.nbytes
    a = t.data_ptr()
    return a < hi and a + t.numel() * t.element_size() > lo


def prepare_input(ws: Workspace, x: torch.Tensor, data) -> tuple[torch.Tensor, bool]:
    """(x to read, zero_copy)."""
    if x.is_contiguous() and x.data_ptr() == data.local.data_ptr():
        return x, True
    if _overlaps(x, data):               # some other slice of the area: copy-in would overlap
        return x.clone(), False
    return x.contiguous(), False


def check_out(out: torch.Tensor, x: torch.Tensor, data) -> None:
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {tuple(x.shape)} {x.dtype}")
    if _overlaps(out, data):
        raise ValueError("out must not live in the symmetric all-reduce area (peers read it)")


def pick_variant(world: int, nbytes: int) -> str:
    """Placeholder heuristic for ``variant="auto"`` (pure function of shape and world)."""
    return "one_shot" if nbytes <= ONE_SHOT_MAX_BYTES.get(world, 0) else "two_shot"


def launch_config(ws: Workspace, variant: str, n: int, ctas: int | None = None,
                  num_warps: int | None = None, unroll: int | None = None) -> dict:
    """Grid and constexprs; pure function of (world, variant, n, ctas, num_warps, unroll) -> the
    same on every rank.  ``unroll`` (one-shot): 16-B vectors per thread and peer per iteration."""
    from tdcompile.kernels.tiles import num_sms
    W = ws.world
    nw = num_warps or NUM_WARPS
    if variant == "one_shot":
        unroll = unroll or (2 if W <= 4 else 1)      # W * unroll 16-B loads in flight per thread
        block = nw * 32 * VEC * unroll
        meta = dict(BLOCK=block)
    elif variant == "two_shot":
        sub = nw * 32 * VEC
        block = sub * W
        meta = dict(SUB=sub)
    else:
        raise ValueError(f"all_reduce variant must be one of {VARIANTS} or 'auto', got {variant!r}")
    # every CTA of every rank must be able to be resident at once (per-block barriers): real
    # ranks <= SM count, simulated ranks share one GPU -> SMs / W
    limit = num_sms() if ws.sim is None else max(1, num_sms() // W)
    grid = max(1, min(triton.cdiv(n, block), ctas or DEFAULT_CTAS, limit, MAX_CTAS))
    return dict(grid=grid, block=block, num_warps=nw, meta=meta)


def config(ws: Workspace, nbytes: int, n: int, sms: int):
    """Compatibility: (one_shot, elements per chunk, grid) of the ``auto`` choice."""
    v = pick_variant(ws.world, nbytes)
    cfg = launch_config(ws, v, n)
    return v == "one_shot", cfg["block"], cfg["grid"]


def unsupported_reason(ws: Workspace, x: torch.Tensor) -> str | None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {x.dtype} (fused kernels take bf16/fp16)"
    if x.dim() == 0 or x.numel() == 0:
        return "empty or 0-d input"
    if x.numel() >= 2 ** 30:
        return f"{x.numel()} elements (>= 2**30)"
    rows = x.numel() // x.shape[-1]
    if rows > ws.max_m:
        return f"{rows} rows > workspace max M {ws.max_m} (TDCOMPILE_MAX_M)"
    return None


def err_base(op_id: int, rank: int) -> int:
    return ((op_id + 1) << 16) | ((rank & 0xFF) << 8)


def sig_args(sigr):
    """(peer flag table, own flags int32, own counters int32)."""
    flags = sigr.local.view(torch.int32)
    return sigr.ptrs, flags, flags[MAX_CTAS * SLOT_STRIDE: MAX_CTAS * SLOT_STRIDE + MAX_CTAS]


@phased
def all_reduce(ws: Workspace, x: torch.Tensor, out: torch.Tensor | None = None, variant: str = "auto",
               ctas: int | None = None, num_warps: int | None = None, unroll: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``ws`` (bf16/fp16, any shape), launched on the current
    stream; ``x`` may be the view from ``symm_input`` (zero copy).  ``variant``: "one_shot",
    "two_shot" or "auto"; ``ctas``: grid size (default ``DEFAULT_CTAS``, capped by the work)."""
    ws.check()
    reason = unsupported_reason(ws, x)
    if reason:
        raise _Unsupported(reason)
    n = x.numel()
    data, sigr, cap = regions(ws, x.shape[-1], n)
    if n > cap:
        raise _Unsupported(f"{n} elements > all_reduce input area ({cap})")
    x, zero_copy = prepare_input(ws, x, data)
    if out is None:
        out = torch.empty_like(x)
    check_out(out, x, data)
    if variant == "auto":
        variant = pick_variant(ws.world, n * x.element_size())
    cfg = launch_config(ws, variant, n, ctas, num_warps, unroll)
    even = n % VEC == 0
    n_arg = n // VEC if even else n
    sig_tab, flags, cnt = sig_args(sigr)
    common = (data.ptrs, sig_tab, flags, cnt, ws.err_addr, err_base(OP_ID, ws.rank), ws.rank, ws.timeout_us)
    kw = dict(WORLD=ws.world, COPY_IN=not zero_copy, EVEN=even, num_warps=cfg["num_warps"], **cfg["meta"])
    if variant == "one_shot":
        kernel, args = _one_shot_kernel, (x, out, n_arg) + common
    else:
        kernel, args = _two_shot_kernel, (x, out, n_arg, cap // VEC) + common
    grid = (cfg["grid"],)
    from tdcompile.kernels.tiles import preload
    preload(kernel, grid, *args, **kw)          # compile + load before anything waits on a peer
    yield
    kernel[grid](*args, **kw)
    return out
