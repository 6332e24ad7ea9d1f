"""A persistent Triton GEMM whose operands move by TMA (Hopper tensor descriptors), for the
fused ops whose GEMM must be Triton's (tiles that wait on per-shard flags).

Issue 11 measured the pointer-load GEMM (``tiles.mm_tile``: ``cp.async`` + ``wgmma``, a plain
``range`` over tiles) at 0.57-0.9x cuBLAS on the Qwen3-32B shapes, so no fused op built on it
could win.  This one follows the designs in ``shared/reference/fast-kernels.md`` section 5:

* host ``TensorDescriptor``s for A [M, K], B and C [M, N]: the TMA unit moves whole
  ``BLOCK_SIZE_M x BLOCK_SIZE_K`` boxes into shared memory (no per-thread address math, no
  masks: rows/columns past the edge read as zero and are never stored);
* B is the ``nn.Linear`` weight as stored, [N, K] row-major (``B_KN=False``: ``tl.dot(a, b.T)``),
  or a row-major [K, N] matrix (``B_KN=True``);
* one CTA per SM walks the tiles with ``tl.range`` in grouped order (L2 reuse); alone, the tile
  and K loops form one software pipeline (``FLATTEN``: the next tile's loads fly while this one
  is stored); C may be stored in two halves (``EPILOGUE_SUBTILE``: less shared memory for C,
  one more stage for A/B).

``ACC_IN`` adds the tile to what C holds (``C += A @ B``, as cuBLAS's ``addmm_`` with beta = 1).
``WORLD > 1`` makes it the GEMM of an all-gather + GEMM: A is the gathered [WORLD*m_seg, K] matrix,
the tiles of shard ``s = (rank + i) % WORLD`` come i-th, and before its first tile of a
peer's shard each CTA waits (bounded, ``signals.wait_geq``) for that shard's flag, written by
the copy engine after the shard's copy.  TMA reads go through the async proxy, so a
``fence.proxy.async`` follows the acquire.  Shards must then be whole row tiles
(``m_seg % BLOCK_SIZE_M == 0``), so no box straddles two shards; ``unsupported_reason`` says so.

Configs come from ``tma_configs`` and are picked by shape in ``pick_tma_config``, from the
measurement in ``benchmarks/bench_gemm.py`` (one GPU, cuBLAS timed beside it).  On one H100 at
M=4096 the picks ran at 0.83-1.14x cuBLAS over the Qwen3-32B per-rank shapes (o_proj 1.05-1.14x,
gate_proj 0.87-0.96x), the pointer-load GEMM at 0.68-0.92x in the same runs; accumulating at the
chain's chunk sizes (M = 512-1024) at 0.63-0.69x of cuBLAS's ``addmm_``
(``benchmarks/results/gemm-h100-80gb-hbm3-20261207-*.json``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from tdcompile.kernels.signals import record_error, wait_geq
from tdcompile.kernels.tiles import _spec, num_sms, swizzle


@dataclass(frozen=True, kw_only=True)
class TmaConfig:
    BLOCK_SIZE_M: int
    """Rows of A per tile (64 = one warpgroup's wgmma M)."""
    BLOCK_SIZE_N: int
    """Columns of C per tile."""
    BLOCK_SIZE_K: int
    """Depth of one TMA box / one wgmma chain step."""
    GROUP_SIZE_M: int = 8
    """Row tiles walked together (grouped order: a B column panel stays in L2)."""
    num_warps: int = 8
    """Warps per CTA (8: two consumer warpgroups for a 128-row tile)."""
    num_stages: int = 3
    """Shared-memory pipeline depth of the K loop."""
    EPILOGUE_SUBTILE: bool = False
    """Store C as two [BLOCK_SIZE_M, BLOCK_SIZE_N / 2] halves (less shared memory for C)."""
    FLATTEN: bool = True
    """One software pipeline across tiles and K steps (the GEMM alone only: ``WORLD = 1``)."""

    def name(self) -> str:
        return (f"{self.BLOCK_SIZE_M}x{self.BLOCK_SIZE_N}x{self.BLOCK_SIZE_K}"
                f"w{self.num_warps}s{self.num_stages}{'e' if self.EPILOGUE_SUBTILE else ''}"
                f"{'' if self.FLATTEN else 'n'}")

    def kwargs(self) -> dict:
        return dict(BLOCK_SIZE_M=self.BLOCK_SIZE_M, BLOCK_SIZE_N=self.BLOCK_SIZE_N, BLOCK_SIZE_K=self.BLOCK_SIZE_K,
                    GROUP_SIZE_M=self.GROUP_SIZE_M, EPILOGUE_SUBTILE=self.EPILOGUE_SUBTILE, FLATTEN=self.FLATTEN,
                    num_warps=self.num_warps, num_stages=self.num_stages)


def tma_configs() -> list[TmaConfig]:
    """The candidates ``benchmarks/bench_gemm.py`` measures (Hopper, bf16/fp16).  No warp
    specialisation: ``tl.range(warp_specialize=True)`` compiled to the same sm_90 PTX as without
    it (Triton 3.6, checked offline for 128x256 and 128x128 tiles)."""
    big = [TmaConfig(BLOCK_SIZE_M=128, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=64, num_warps=w, num_stages=s,
                     EPILOGUE_SUBTILE=e, FLATTEN=f)
           for bn, w, s, e, f in ((256, 8, 3, True, True), (256, 8, 3, True, False), (256, 8, 4, True, True),
                                  (256, 8, 3, False, True), (128, 8, 4, False, True), (128, 8, 4, False, False),
                                  (128, 4, 4, False, True), (128, 8, 5, True, True))]
    small = [TmaConfig(BLOCK_SIZE_M=64, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, num_warps=4, num_stages=s)
             for bn, bk, s in ((64, 128, 6), (128, 128, 4), (64, 64, 8))]
    return big + small


def pick_tma_config(m_rows: int, n: int, k: int, accumulate: bool = False) -> TmaConfig:
    """Pure function of the shape (same answer on every rank), from the measurement of every
    ``tma_configs()`` candidate on the Qwen3-32B shapes at TP=2 and TP=4 (1×H100,
    ``benchmarks/results/gemm-h100-80gb-hbm3-20261207-154651.json``): 128x256 tiles with the split
    epilogue everywhere above 128 rows (4 stages when K <= 4096: o_proj 1.10-1.14x cuBLAS, 3
    otherwise: down_proj 1.11x at K=12800), 128x128 with 5 stages for narrow N (k/v_proj); at
    decode sizes 64x128 tiles for N > 4096, 64x64 below.  ``accumulate`` (C is read back into
    shared memory too): 3 stages, as 4 no longer fit in 227 KB (262 KB, compiled offline)."""
    if m_rows <= 128:
        if n > 4096:
            return TmaConfig(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128, num_warps=4, num_stages=4)
        return TmaConfig(BLOCK_SIZE_M=64, BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, num_warps=4, num_stages=6)
    if n <= 512:
        return TmaConfig(BLOCK_SIZE_M=128, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, num_warps=8, num_stages=5,
                         EPILOGUE_SUBTILE=True)
    return TmaConfig(BLOCK_SIZE_M=128, BLOCK_SIZE_N=256, BLOCK_SIZE_K=64, num_warps=8,
                     num_stages=4 if k <= 4096 and not accumulate else 3, EPILOGUE_SUBTILE=True)


@triton.jit
def _proxy_fence():
    """``fence.proxy.async.global``: generic-proxy acquire before async-proxy (TMA) reads."""
    tl.inline_asm_elementwise("fence.proxy.async.global;\n mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def tma_tile(a_desc, b_desc, row0, col0, K, B_KN: tl.constexpr, BLOCK_SIZE_M: tl.constexpr,
             BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr):
    """fp32 ``A[row0:+BM, :] @ B[:, col0:+BN]``, both operands by TMA (rows / columns past the
    edge read as zero)."""
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for kk in range(tl.cdiv(K, BLOCK_SIZE_K)):
        a = a_desc.load([row0, kk * BLOCK_SIZE_K])                           # [BM, BK]
        if B_KN:
            acc = tl.dot(a, b_desc.load([kk * BLOCK_SIZE_K, col0]), acc)     # [BK, BN]
        else:
            acc = tl.dot(a, b_desc.load([col0, kk * BLOCK_SIZE_K]).T, acc)   # [BN, BK]
    return acc


@triton.jit(do_not_specialize=["m_seg", "rank", "err_code", "timeout_us"])
def _tma_gemm_kernel(a_desc, b_desc, c_desc, progress_ptr, m_seg, N, K, err_addr, err_code, rank, timeout_us,
                     WORLD: tl.constexpr, B_KN: tl.constexpr, BLOCK_SIZE_M: tl.constexpr,
                     BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
                     EPILOGUE_SUBTILE: tl.constexpr, FLATTEN: tl.constexpr, ACC_IN: tl.constexpr = False):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    num_pid_m = tl.cdiv(m_seg, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    tps = num_pid_m * num_pid_n                       # tiles per shard
    ok = 1
    # FLATTEN (WORLD = 1 only): one software pipeline over tiles x K steps, so the TMA loads of the
    # next tile are in flight while this tile's last wgmma and its store run; with WORLD > 1 they
    # could be issued before that tile's flag wait, so each tile's K loop is pipelined alone
    for t in tl.range(pid, WORLD * tps, G, flatten=FLATTEN and WORLD == 1):
        i = t // tps
        s = (rank + i) % WORLD                        # own shard first, then the pull order
        if WORLD > 1:
            if i != 0:
                ok = ok & wait_geq(progress_ptr + s, 1, timeout_us.to(tl.int64) * 1000 * ok)
                _proxy_fence()
                tl.debug_barrier()
        if ok != 0:
            pid_m, pid_n = swizzle(t % tps, num_pid_m, num_pid_n, GROUP_SIZE_M)
            row0 = s * m_seg + pid_m * BLOCK_SIZE_M
            col0 = pid_n * BLOCK_SIZE_N
            acc = tma_tile(a_desc, b_desc, row0, col0, K, B_KN, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K)
            if EPILOGUE_SUBTILE:
                halves = tl.permute(tl.reshape(acc, (BLOCK_SIZE_M, 2, BLOCK_SIZE_N // 2)), (0, 2, 1))
                c0, c1 = tl.split(halves)                                    # [BM, BN/2] each
                if ACC_IN:                                                   # C += A @ B (fp32 add, one rounding)
                    c0 += c_desc.load([row0, col0]).to(tl.float32)
                    c1 += c_desc.load([row0, col0 + BLOCK_SIZE_N // 2]).to(tl.float32)
                c_desc.store([row0, col0], c0.to(c_desc.dtype))
                c_desc.store([row0, col0 + BLOCK_SIZE_N // 2], c1.to(c_desc.dtype))
            else:
                if ACC_IN:
                    acc += c_desc.load([row0, col0]).to(tl.float32)
                c_desc.store([row0, col0], acc.to(c_desc.dtype))
    if WORLD > 1:                                     # (WORLD = 1 waits for nothing and records nothing)
        if ok == 0:
            record_error(err_addr, err_code)


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and (t.dim() < 2 or (t.stride(0) * t.element_size()) % 16 == 0)


def b_layout(b: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """(the row-major matrix to describe, B_KN) for ``b`` [K, N], or None if TMA cannot read it."""
    if b.stride(1) == 1 and _aligned(b):
        return b, True
    bt = b.t()                                        # [N, K]: the nn.Linear weight as stored
    if bt.stride(1) == 1 and _aligned(bt):
        return bt, False
    return None


def unsupported_reason(a: torch.Tensor, b: torch.Tensor, m_seg: int | None = None,
                       cfg: TmaConfig | None = None) -> str | None:
    """Why the TMA GEMM cannot take ``a @ b`` (None if it can)."""
    if a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        return f"dtypes {a.dtype}/{b.dtype}"
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or 0 in a.shape or 0 in b.shape:
        return "shapes"
    if not _aligned(a):
        return "A not 16-byte aligned / row-major"
    if b_layout(b) is None:
        return "B not 16-byte aligned in either layout"
    if (b.shape[1] * a.element_size()) % 16:
        return "N * element size not a multiple of 16 bytes (C rows)"
    if m_seg is not None and cfg is not None and m_seg % cfg.BLOCK_SIZE_M:
        return f"shard rows {m_seg} not a multiple of BLOCK_SIZE_M={cfg.BLOCK_SIZE_M}"
    return None


def launch_args(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, cfg: TmaConfig) -> tuple:
    """(a_desc, b_desc, c_desc, B_KN) for ``c = a @ b`` under ``cfg``."""
    bm, b_kn = b_layout(b)
    BM, BN, BK = cfg.BLOCK_SIZE_M, cfg.BLOCK_SIZE_N, cfg.BLOCK_SIZE_K
    a_desc = TensorDescriptor.from_tensor(a, [BM, BK])
    b_desc = TensorDescriptor.from_tensor(bm, [BK, BN] if b_kn else [BN, BK])
    c_desc = TensorDescriptor.from_tensor(c, [BM, BN // 2 if cfg.EPILOGUE_SUBTILE else BN])
    return a_desc, b_desc, c_desc, b_kn


_LOADED: set = set()


def preload(kernel, grid, *args, **kwargs) -> None:
    """``tiles.preload`` for kernels taking tensor descriptors: compile and load the variant for
    these arguments before anything that waits on a peer is launched (a descriptor specialises
    on its dtype and box shape)."""
    key = (id(kernel), torch.cuda.current_device(),
           tuple(("desc", str(v.base.dtype), tuple(v.block_shape)) if isinstance(v, TensorDescriptor) else _spec(v)
                 for v in args),
           tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    if key in _LOADED:
        return
    ck = kernel.warmup(*args, grid=grid, **kwargs)
    if hasattr(ck, "result"):
        ck = ck.result()
    ck._init_handles()
    _LOADED.add(key)


def tma_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, cfg: TmaConfig | None = None,
             grid_sms: int | None = None, accumulate: bool = False) -> torch.Tensor:
    """``a @ b`` ([M, K] @ [K, N]) with the TMA GEMM, no communication: the launcher (check,
    allocate, launch).  ``b`` may be the transposed view of an [N, K] weight.  ``accumulate``:
    ``out += a @ b`` (``torch.addmm(out, a, b, out=out)``: the sum in fp32, rounded once)."""
    reason = unsupported_reason(a, b)
    if not reason and out is not None and (out.shape != (a.shape[0], b.shape[1]) or out.dtype != a.dtype
                                           or not _aligned(out)):
        reason = "out must be [M, N] of A's dtype, 16-byte aligned, row-major"
    if not reason and accumulate and out is None:
        reason = "accumulate needs out"
    if reason:
        raise ValueError(f"tma_gemm: {reason}")
    M, K = a.shape
    N = b.shape[1]
    cfg = cfg or pick_tma_config(M, N, K, accumulate)
    c = out if out is not None else torch.empty((M, N), dtype=a.dtype, device=a.device)
    a_desc, b_desc, c_desc, b_kn = launch_args(a, b, c, cfg)
    tiles = triton.cdiv(M, cfg.BLOCK_SIZE_M) * triton.cdiv(N, cfg.BLOCK_SIZE_N)
    grid = (max(1, min(grid_sms or num_sms(), tiles)),)
    _tma_gemm_kernel[grid](a_desc, b_desc, c_desc, a, M, N, K, 0, 0, 0, 1, WORLD=1, B_KN=b_kn, ACC_IN=accumulate,
                           **cfg.kwargs())
    return c
