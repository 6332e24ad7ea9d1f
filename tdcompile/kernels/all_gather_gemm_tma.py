"""All-gather + GEMM(s) on the TMA GEMM (``all_gather_gemm`` variant ``tma``): the copy engine
pulls the peers' shards, one persistent TMA GEMM per weight computes every shard's tiles and
waits on a shard's flag only before its first tile of that shard (``kernels/gemm_tma.py``).

Same protocol, buffers and barriers as the ``fused`` variant (``kernels/all_gather_gemm.py``),
so calls of ``fused``, ``ce`` and ``tma`` may interleave::

    main:  flags = 0 ─ copy-in (own shard -> symmetric buffer and A) ─ ENTRY barrier ─ GEMM(b_0) ─ GEMM(b_1) ─ join ─ EXIT barrier
    side:                                                    pull s1 ─ flag s1 ─ pull s2 ─ flag s2 ...

(s_i = (rank + i) % W.)  Unlike ``ce``, which runs W cuBLAS GEMMs per weight (one per shard,
each with its own tail wave), the GEMM here is one launch per weight over all W·tiles, and the
own shard's tiles start at once.  What stays exposed: the pulls the own shard's tiles cannot
hide (small M, W=4) and the EXIT barrier.  Shards must be whole row tiles
(``m % BLOCK_SIZE_M == 0``) and every operand TMA-aligned; ``unsupported_reason`` says why not.
Every wait is bounded (``TDCOMPILE_SPIN_TIMEOUT_S``) and recorded as op ``all_gather_gemm``,
this rank.  Testable on one GPU with simulated ranks.
"""
from __future__ import annotations

import torch
import triton

from tdcompile.kernels import signals as sig
from tdcompile.kernels.all_gather_gemm import ENTRY_CHANNEL, EXIT_CHANNEL, OP_ID, _ag_barrier, _write_flag
from tdcompile.kernels.gemm_tma import _tma_gemm_kernel, launch_args, pick_tma_config
from tdcompile.kernels.gemm_tma import preload as preload_gemm
from tdcompile.kernels.gemm_tma import unsupported_reason as tma_reason
from tdcompile.kernels.symm import MAX_WORLD, PAD_SLOTS, Workspace, _Unsupported, phased
from tdcompile.kernels.tiles import num_sms, preload, unsupported_gemm_reason

REGION = "all_gather_gemm.shard"       # shared with the ``fused`` and ``ce`` variants


def unsupported_reason(ws: Workspace, a: torch.Tensor, bs) -> str | None:
    bs = list(bs)
    M = a.shape[0] * ws.world if a.dim() == 2 else 0
    reason = unsupported_gemm_reason(ws, a, bs, None, M)
    if reason:
        return reason
    A = torch.empty((1, a.shape[1]), dtype=a.dtype, device="meta")   # the gathered buffer's layout, no allocation
    for b in bs:
        cfg = pick_tma_config(M, b.shape[1], a.shape[1])
        reason = tma_reason(A, b, a.shape[0], cfg)
        if reason:
            return f"TMA GEMM: {reason}"
    return None


@phased
def all_gather_gemm_tma(ws: Workspace, a_shard: torch.Tensor, bs: list, return_a: bool = False,
                        out: tuple | None = None):
    """``(A if return_a else empty, [A @ b for b in bs])`` with A the row-concatenation of every
    rank's ``a_shard`` ([m, K] each, A [W*m, K]); on the current stream (module docstring).
    ``out``: ``(A or None, [outputs])`` to write into (contiguous, allocated by the caller)."""
    ws.check()
    reason = unsupported_reason(ws, a_shard, bs)
    if reason:
        raise _Unsupported(reason)
    W, r = ws.world, ws.rank
    m, K = a_shard.shape
    M = W * m
    dt, esz = a_shard.dtype, a_shard.element_size()
    shard = ws.region(REGION, triton.cdiv(ws.max_m, W) * K * esz)
    A = out[0] if out is not None and out[0] is not None else torch.empty((M, K), dtype=dt, device=a_shard.device)
    outs = list(out[1]) if out is not None else [torch.empty((M, b.shape[1]), dtype=dt, device=a_shard.device)
                                                 for b in bs]
    cur = torch.cuda.current_stream()
    # SMs left free for what the GEMM waits on: same-device copies in simulation run as kernels,
    # and memset nodes (the flags) in graphs
    reserve = 4 if ws.sim is not None else (2 if torch.cuda.is_current_stream_capturing() else 0)
    sms = num_sms() // (W if ws.sim is not None else 1) - reserve
    code = sig.error_code(OP_ID, r, sig.WHAT_SHARD_FLAG)
    launches = []
    for b, c in zip(bs, outs):
        N = b.shape[1]
        cfg = pick_tma_config(M, N, K)
        a_desc, b_desc, c_desc, b_kn = launch_args(A, b, c, cfg)
        tiles = W * triton.cdiv(m, cfg.BLOCK_SIZE_M) * triton.cdiv(N, cfg.BLOCK_SIZE_N)
        grid = (max(1, min(sms, tiles)),)
        args = (a_desc, b_desc, c_desc, ws.progress, m, N, K, ws.err_addr, code, r, ws.timeout_us)
        kw = dict(WORLD=W, B_KN=b_kn, **cfg.kwargs())
        preload_gemm(_tma_gemm_kernel, grid, *args, **kw)
        launches.append((grid, args, kw))
    pad_stride = PAD_SLOTS * MAX_WORLD
    epoch = ws.bump_epoch("all_gather_gemm")
    bcode = sig.error_code(OP_ID, r, sig.WHAT_BARRIER)
    preload(_ag_barrier, (1,), ws.pads.ptrs, ENTRY_CHANNEL * pad_stride, epoch, ws.err_addr, bcode, r, ws.timeout_us,
            WORLD=W, num_warps=1)
    ws.progress.zero_()
    shard.local[: m * K * esz].view(dt).view(m, K).copy_(a_shard)                # [m, K]
    A[r * m:(r + 1) * m].copy_(a_shard)
    yield
    _ag_barrier[(1,)](ws.pads.ptrs, ENTRY_CHANNEL * pad_stride, epoch, ws.err_addr, bcode, r, ws.timeout_us,
                      WORLD=W, num_warps=1)
    ws.side.wait_stream(cur)
    flags_u32 = ws.progress.view(torch.uint32)
    yield
    with torch.cuda.stream(ws.side):
        for i in range(1, W):
            s = (r + i) % W
            A[s * m:(s + 1) * m].copy_(shard.peers[s][: m * K * esz].view(dt).view(m, K))
            _write_flag(flags_u32, s, 1)
    yield
    for grid, args, kw in launches:
        _tma_gemm_kernel[grid](*args, **kw)
    cur.wait_stream(ws.side)
    _ag_barrier[(1,)](ws.pads.ptrs, EXIT_CHANNEL * pad_stride, epoch, ws.err_addr,
                      sig.error_code(OP_ID, r, sig.WHAT_EXIT_BARRIER), r, ws.timeout_us, WORLD=W, num_warps=1)
    return (A if return_a else A.new_empty(0)), outs
