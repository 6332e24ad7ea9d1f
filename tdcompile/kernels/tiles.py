"""Shared GEMM building blocks for the fused kernels: tile configs (chosen on the host from
the shape only, identically on every rank: no autotuning in kernels that wait on peers),
the tile swizzle and the K main loop.  Strides are runtime arguments (``b`` may be the
transposed view of a row-major ``nn.Linear`` weight)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_SIZE_M: int
    BLOCK_SIZE_N: int
    BLOCK_SIZE_K: int
    GROUP_SIZE_M: int
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict:
        return dict(BLOCK_SIZE_M=self.BLOCK_SIZE_M, BLOCK_SIZE_N=self.BLOCK_SIZE_N, BLOCK_SIZE_K=self.BLOCK_SIZE_K,
                    GROUP_SIZE_M=self.GROUP_SIZE_M, num_warps=self.num_warps, num_stages=self.num_stages)


def gemm_configs() -> list[GemmConfig]:
    """Fixed configs (Hopper): small-M (memory bound), medium, large (compute bound)."""
    return [
        GemmConfig(64, 64, 128, 8, 4, 4),
        GemmConfig(128, 128, 64, 8, 8, 4),
        GemmConfig(128, 256, 64, 8, 8, 3),
    ]


def pick_config(m_rows: int, n: int, k: int) -> GemmConfig:
    """Pure function of the shape (same answer on every rank)."""
    small, medium, large = gemm_configs()
    if m_rows <= 128:
        return small
    if m_rows * n <= 2048 * 5120:
        return medium
    return large


def unsupported_gemm_reason(ws, a, bs: list, bias, m_total: int) -> str | None:
    """Why a fused GEMM kernel cannot take these inputs (None if it can): the checks the three
    GEMM ops share. ``m_total``: rows of the full (gathered or pre-scatter) GEMM."""
    if a.dtype not in (torch.bfloat16, torch.float16) or any(b.dtype != a.dtype for b in bs):
        return f"dtypes {a.dtype}/{[b.dtype for b in bs]} (fused kernels take bf16/fp16)"
    if bias is not None and (bias.dtype != a.dtype or bias.dim() != 1):
        return "bias dtype/shape"
    if not bs or a.dim() != 2 or any(b.dim() != 2 or b.shape[0] != a.shape[1] for b in bs):
        return "shapes"
    if m_total > ws.max_m:
        return f"M={m_total} > workspace max M {ws.max_m} (TDCOMPILE_MAX_M)"
    if a.shape[0] == 0 or any(b.shape[1] == 0 for b in bs):
        return "empty"
    return None


def num_sms() -> int:
    import torch
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


@triton.jit
def swizzle(t, num_pid_m, num_pid_n, GROUP_SIZE_M: tl.constexpr):
    """Grouped ordering of tile ``t`` over a ``num_pid_m x num_pid_n`` grid (L2 reuse)."""
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = t // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((t % num_pid_in_group) % group_size_m)
    pid_n = (t % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def col_offsets(pid_n, N, BLOCK_SIZE_N: tl.constexpr, EVEN_N: tl.constexpr):
    """Column indices of tile ``pid_n``, clamped to valid columns; when ``N % BLOCK_SIZE_N == 0``
    they keep their contiguity hints (vectorised, cp.async-pipelined loads of B)."""
    cols = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    if EVEN_N:
        return tl.max_contiguous(tl.multiple_of(cols, BLOCK_SIZE_N), BLOCK_SIZE_N)
    else:
        return tl.where(cols < N, cols, 0)


@triton.jit
def mm_tile(a_ptr, b_ptr, rows, cols, K, stride_am, stride_ak, stride_bk, stride_bn,
            BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
            EVEN_K: tl.constexpr):
    """fp32 accumulator of ``A[rows, :] @ B[:, cols]``; ``rows``/``cols`` must already be
    clamped to valid indices (the caller masks the store)."""
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - kk * BLOCK_SIZE_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk
    return acc


@triton.jit
def add_bias(acc, bias_ptr, cols, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    return acc


_LOADED: set = set()


def _spec(v):
    import torch
    if isinstance(v, torch.Tensor):
        return (str(v.dtype), v.data_ptr() % 16 == 0)
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return (v == 1, v % 16 == 0, abs(v) >= 2 ** 31)
    return v


def preload(kernel, grid, *args, **kwargs):
    """Compile AND load ``kernel``'s variant for these arguments without launching it.

    Must be called for every kernel an op will launch before the op launches anything that
    waits on another rank: loading a module while a spinning kernel runs can block (the
    deadlock in GPU_NOTES).  Cached by a cheap key mirroring Triton's specialisation."""
    import torch
    # keyword arguments are constexprs and launch options (BLOCK, num_warps, EVEN...): every value
    # is its own variant -- keyed by _spec, num_warps=4 and 8 (or BLOCK 1024 and 2048) collided,
    # so the second was compiled at its first launch, with a simulated peer spinning (the W=4
    # two-shot Lamport test timeouts of 2026-11-27)
    key = (id(kernel), torch.cuda.current_device(), tuple(_spec(a) for a in args),
           tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    if key in _LOADED:
        return
    ck = kernel.warmup(*args, grid=grid, **kwargs)
    if hasattr(ck, "result"):
        ck = ck.result()
    ck._init_handles()
    _LOADED.add(key)
