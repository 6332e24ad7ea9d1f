"""Residual add + RMSNorm, one row per program: the stand-in for the kernel Inductor generates
after a TP all-reduce (HF's ``residual + h`` then ``Qwen3RMSNorm``), used by the CUDA ``unfused``
implementation of ``tdist::all_reduce_rmsnorm``.

Why: ``unfused`` is the baseline every fused candidate is measured against, and it must cost
what Inductor's code costs.  The reference's eager sequence (add, to, pow, mean, add, rsqrt, mul,
to, mul) is ~8 kernels, so the measurement used to time NCCL alone instead -- a lower bound that
left out the norm kernel every fused candidate replaces.  An all-reduce claimed by both
``gemm_all_reduce`` and ``all_reduce_rmsnorm`` is settled by comparing their gains over their own
``unfused``, and that lower bound understated the RMSNorm fusion's gain by the norm kernel (3.4 us
at 128x5120 in a 4xH200 decode trace).  With this kernel the baseline is NCCL + one fused norm,
as Inductor runs it.  Same arithmetic as the fused epilogues (``all_reduce_rmsnorm._epilogue``:
HF's casts), so the outputs equal the reference's up to the reduction order of the mean.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tdcompile.kernels.all_reduce_rmsnorm import MAX_N, _epilogue


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, N: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    cm = cols < N
    o = row * N + cols
    dt = out_ptr.dtype.element_ty
    nr, y = _epilogue(tl.load(x_ptr + o, mask=cm, other=0.0), tl.load(res_ptr + o, mask=cm, other=0.0),
                      tl.load(w_ptr + cols, mask=cm, other=0.0), cm, eps, N, dt)
    tl.store(res_out_ptr + o, nr, mask=cm)
    tl.store(out_ptr + o, y, mask=cm)


def supported(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.dim() >= 1
            and 0 < x.shape[-1] <= MAX_N and residual.shape == x.shape and residual.dtype == x.dtype
            and weight.shape == (x.shape[-1],) and weight.dtype == x.dtype)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, new_residual)`` with ``new_residual = residual + x`` (in dtype) and ``normed =
    weight * rmsnorm(new_residual)``; ``supported(...)`` must hold."""
    if not supported(x, residual, weight):
        raise ValueError("add_rmsnorm: CUDA x, residual [..., N] and weight [N] of one dtype, N <= MAX_N")
    x, residual, weight = x.contiguous(), residual.contiguous(), weight.contiguous()
    N = x.shape[-1]
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    block_n = triton.next_power_of_2(N)
    if x.numel():
        _add_rmsnorm_kernel[(x.numel() // N,)](x, residual, weight, out, res_out, float(eps), N=N, BLOCK_N=block_n,
                                               num_warps=8 if block_n <= 8192 else 16)
    return out, res_out
