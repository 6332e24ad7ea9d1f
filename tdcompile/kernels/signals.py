"""Signal and barrier helpers for Triton kernels over symmetric memory (upstream Triton 3.6).

Memory-ordering patterns supported (and the only ones the kernels use):

* **Release / acquire at system scope.**  A producer writes data (plain stores, local or
  to a peer through NVLink), every thread executes ``fence.acq_rel.sys`` (``fence_sys``),
  the CTA synchronises (``tl.debug_barrier`` = ``bar.sync``), then ONE thread publishes a
  flag with ``atom.release.sys`` (``signal``: a scalar ``tl.atomic_xchg`` is executed by a
  single thread).  A consumer spins with ``ld.acquire.sys`` (``wait_geq``), executes
  ``bar.sync``, then reads the data.  ``scope="sys"`` is used everywhere, also for flags
  written by the copy engine on the same GPU (``cuStreamWriteValue32`` / memset).
* **Epoch flags, never reset.**  Flags carry a monotonically increasing epoch that lives
  on the device (``Workspace.epoch`` incremented by a stream-ordered ``add_`` at the start
  of every op call), so CUDA-graph replays never see a host counter baked into the graph.
  Waits compare with wrap-around arithmetic (``flag - epoch >= 0`` as signed 32-bit).
* **Bounded spin waits.**  Every wait reads ``%globaltimer`` and gives up after
  ``timeout_ns``; the caller then records ``(op, rank, what)`` in a host-mapped pinned error
  word (``record_error``) and skips the rest of its work.  The launcher turns a non-zero
  error word into ``RuntimeError`` naming the op and the rank.  A CTA that already timed out
  passes ``timeout_ns = 0`` to later waits, so a dead peer costs one timeout per CTA.
* **Per-block barrier** (``block_barrier``): block ``b`` of every rank writes the epoch into
  slot ``[b, my_rank]`` of every peer's pad and waits until its own slots ``[b, *]`` reach
  the epoch.  All ranks must launch the same grid.
"""
import triton
import triton.language as tl

# What a wait was doing when it timed out (low byte of the error word).
WHAT_BARRIER = 1
WHAT_TILE_FLAG = 2
WHAT_SHARD_FLAG = 3
WHAT_EXIT_BARRIER = 4


def error_code(op_id: int, rank: int, what: int = 0) -> int:
    """Error word layout: bits 16..23 op id + 1, bits 8..15 rank, bits 0..7 what (non-zero)."""
    return ((op_id + 1) << 16) | ((rank & 0xFF) << 8) | (what & 0xFF or 0xFF)


def decode_error(code: int) -> tuple[int, int, int]:
    return ((code >> 16) & 0xFF) - 1, (code >> 8) & 0xFF, code & 0xFF


@triton.jit
def tid():
    return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def globaltimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def fence_sys():
    """``fence.acq_rel.sys`` executed by every thread (orders its earlier NVLink stores)."""
    tl.inline_asm_elementwise("fence.acq_rel.sys;\n mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def ld_acquire(ptr):
    """``ld.acquire.sys`` of an int32 flag (scalar or block of pointers)."""
    return tl.inline_asm_elementwise("ld.acquire.sys.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def wait_geq(ptr, value, timeout_ns):
    """Spin (``ld.acquire.sys``) until ``*ptr - value >= 0`` (signed, wrap-safe) or until
    ``timeout_ns`` nanoseconds of ``%globaltimer`` passed.  Returns 1 when the flag arrived,
    0 on timeout.  ``ptr`` may be a scalar or a block of int32 pointers; every thread that
    holds an element polls it (same-address polls coalesce within a warp)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 %v;
        .reg .s32 %d;
        .reg .u64 %t0, %t1;
        .reg .pred %p;
        mov.u64 %t0, %globaltimer;
        WAIT_LOOP:
        ld.acquire.sys.global.b32 %v, [$1];
        sub.s32 %d, %v, $2;
        setp.ge.s32 %p, %d, 0;
        @%p bra WAIT_DONE;
        mov.u64 %t1, %globaltimer;
        sub.u64 %t1, %t1, %t0;
        setp.lt.u64 %p, %t1, $3;
        @%p bra WAIT_LOOP;
        mov.u32 $0, 0;
        bra.uni WAIT_END;
        WAIT_DONE:
        mov.u32 $0, 1;
        WAIT_END:
        }""",
        "=r,l,r,l",
        [ptr, value, timeout_ns],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def signal(ptr, value):
    """Publish ``value`` at ``ptr`` (scalar: one thread; block: one thread per element) with
    release semantics at system scope.  Call ``fence_sys(); tl.debug_barrier()`` first."""
    tl.atomic_xchg(ptr, value, sem="release", scope="sys")


@triton.jit
def record_error(err_addr, code):
    """Store ``code`` into the host-mapped pinned error word at address ``err_addr`` (int64)
    unless an earlier error is already recorded (first error wins, modulo races)."""
    p = err_addr.to(tl.pointer_type(tl.int32))
    tl.inline_asm_elementwise(
        """{
        .reg .b32 %c;
        .reg .pred %p;
        ld.relaxed.sys.global.b32 %c, [$1];
        setp.eq.s32 %p, %c, 0;
        @%p st.relaxed.sys.global.b32 [$1], $2;
        mov.u32 $0, 0;
        }""", "=r,l,r", [p, code], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def peer_ptr(tab_ptr, peer, dtype: tl.constexpr):
    """Base address of ``peer``'s symmetric buffer from an int64 pointer table, typed ``dtype``."""
    return tl.load(tab_ptr + peer).to(tl.pointer_type(dtype))


@triton.jit
def block_barrier(pad_tab, pad_off, slot, rank, epoch, timeout_ns, WORLD: tl.constexpr):
    """Cross-rank barrier between block ``slot`` of every rank (same grid on every rank).

    Pads are int32 symmetric arrays; this barrier uses ``pad[pad_off + slot*WORLD + src]``.
    Returns 1 on success, 0 on timeout (the caller records the error)."""
    peers = tl.arange(0, WORLD)
    remote = tl.load(pad_tab + peers).to(tl.pointer_type(tl.int32)) + pad_off + slot * WORLD + rank
    fence_sys()
    tl.debug_barrier()
    tl.atomic_xchg(remote, tl.full([WORLD], 0, tl.int32) + epoch, sem="release", scope="sys")
    own = tl.load(pad_tab + rank).to(tl.pointer_type(tl.int32)) + pad_off + slot * WORLD + peers
    ok = tl.min(wait_geq(own, epoch, timeout_ns), axis=0)
    tl.debug_barrier()
    return ok


# ------------------------------------------------------------------------------ per-block flag barrier
WHAT_MID_BARRIER = 5


@triton.jit
def flag_barrier(sig_tab, my_sig, slot_off, rank, value, timeout_ns, world):
    """Cross-rank barrier of block ``b`` of every rank, in the style of vLLM's custom
    all-reduce barrier (per-block flags, one store per peer, no atomics):

    * ``bar.sync`` (everything this CTA did before is ordered before the signal);
    * threads ``t < world``: ``st.release.sys`` of ``value`` into slot ``slot_off + rank`` of
      peer ``t``'s flag array (base address ``sig_tab[t]``), then spin with
      ``ld.acquire.sys`` on slot ``slot_off + t`` of this rank's flags (``my_sig``) until it
      holds ``>= value`` (signed, wrap-safe) or ``timeout_ns`` of ``%globaltimer`` passed;
    * ``bar.red.and.pred``: the whole CTA waits for those threads and learns whether every
      wait succeeded (release -> acquire -> bar.sync is the cumulative pattern that makes
      the peers' data visible to every thread of the CTA).

    ``value`` is the per-block device-side epoch: a counter of barriers this block slot
    has executed, equal on every rank, so flags never need resetting and nothing from the
    host is baked into CUDA graphs.  A peer can be at most one barrier ahead (it cannot
    pass barrier v+1 before this rank arrives there), so ``>=`` on one slot per
    (block, source) is enough.  Returns 1 (all arrived) or 0 (timeout), CTA-uniform.
    All operands are scalars: the asm runs once in every thread of the CTA."""
    return tl.inline_asm_elementwise(
        """{
        .reg .u32 %tx, %v;
        .reg .s32 %d;
        .reg .u64 %a, %pb, %t0, %t1;
        .reg .pred %act, %p, %ok;
        bar.sync 0;
        mov.u32 %tx, %tid.x;
        setp.eq.u32 %ok, %tx, %tx;
        setp.lt.u32 %act, %tx, $7;
        @!%act bra FB_DONE;
        mul.wide.u32 %a, %tx, 8;
        add.u64 %a, $1, %a;
        ld.global.u64 %pb, [%a];
        add.u32 %v, $3, $4;
        mul.wide.u32 %a, %v, 4;
        add.u64 %a, %pb, %a;
        st.release.sys.global.u32 [%a], $5;
        add.u32 %v, $3, %tx;
        mul.wide.u32 %a, %v, 4;
        add.u64 %a, $2, %a;
        mov.u64 %t0, %globaltimer;
        FB_LOOP:
        ld.acquire.sys.global.u32 %v, [%a];
        sub.s32 %d, %v, $5;
        setp.ge.s32 %p, %d, 0;
        @%p bra FB_DONE;
        mov.u64 %t1, %globaltimer;
        sub.u64 %t1, %t1, %t0;
        setp.lt.u64 %p, %t1, $6;
        @%p bra FB_LOOP;
        setp.ne.u32 %ok, %tx, %tx;
        FB_DONE:
        bar.red.and.pred %p, 0, %ok;
        selp.u32 $0, 1, 0, %p;
        }""",
        "=r,l,l,r,r,r,l,r",
        [sig_tab.to(tl.int64, bitcast=False), my_sig.to(tl.int64, bitcast=False), slot_off, rank, value,
         timeout_ns, world],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def peer_base(tab_ptr, peer, dtype: tl.constexpr):
    """Base address of ``peer``'s symmetric buffer from an int64 table, typed ``dtype`` and
    declared 16-byte aligned (symmetric buffers are page aligned): without this hint Triton
    cannot prove alignment of a loaded pointer and splits 128-bit accesses into 2-byte ones."""
    return tl.multiple_of(tl.load(tab_ptr + peer).to(tl.pointer_type(dtype)), 16)
