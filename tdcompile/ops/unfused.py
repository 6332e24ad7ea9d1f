"""The ``unfused`` CUDA paths of the ``tdist`` ops that have one of their own: what Inductor runs
for the same graph (cuBLAS into a fresh buffer, NCCL in place, one add + RMSNorm kernel).  They
are the baselines the fused candidates are measured against (``measure.py``); the reference
(``ops/reference.py``) is the fallback where they cannot run."""
from __future__ import annotations

import torch

from tdcompile.ops import reference as ref


def gemm_all_reduce(a, b, bias, group_name: str) -> torch.Tensor:
    """``unfused`` on CUDA, as Inductor runs it: cuBLAS into a fresh output, then NCCL reduces that
    output in place (the reference's functional all_reduce would copy it first)."""
    out = torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)      # [M, N]
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_reduce_(out, "sum", group_name))


def all_reduce_rmsnorm(x, residual, weight, eps: float, group_name: str):
    """``unfused`` on CUDA, as Inductor runs it: NCCL, then ONE add + RMSNorm kernel
    (``kernels/add_rmsnorm.py``; the reference's eager norm is ~8 kernels). It is the baseline the
    fused candidates are measured against. NCCL reduces a copy of ``x`` (the op's input), where
    Inductor reuses the GEMM's buffer: ~1 us at 1.3 MB, in favour of the fused candidates. The
    reference where that kernel cannot run."""
    return add_rmsnorm(ref.all_reduce(x, group_name), residual, weight, eps)


def add_rmsnorm(reduced, residual, weight, eps: float):
    """One add + RMSNorm kernel after the all-reduce (``kernels/add_rmsnorm.py``), as Inductor runs
    it; the reference's eager norm where that kernel cannot run (no Triton, unsupported shape)."""
    try:
        from tdcompile.kernels import add_rmsnorm as k
    except ImportError:            # no Triton
        k = None
    if k is not None and k.supported(reduced, residual, weight):
        return k.add_rmsnorm(reduced, residual, weight, eps)
    return ref.rmsnorm_after_all_reduce(reduced, residual, weight, eps)
