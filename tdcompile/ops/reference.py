"""Reference implementations of the ``tdist`` ops: functional collectives + matmul.

These are the correctness oracle and the CPU path. They use the same
``_c10d_functional`` collectives that ``torch.distributed`` emits in traced graphs,
so they run on gloo (CPU), NCCL (CUDA) and the fake process group alike. They are
not a performance path: on CUDA the same sequence is what the cost model calls
"unfused" (NCCL collective + cuBLAS GEMM).
"""
from __future__ import annotations

from typing import Optional

import torch

_c10d = torch.ops._c10d_functional


def _wait(t: torch.Tensor) -> torch.Tensor:
    return _c10d.wait_tensor(t)


def _gemm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _wait(_c10d.all_reduce(x.contiguous(), "sum", group_name))


def gemm_all_reduce(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], group_name: str) -> torch.Tensor:
    return all_reduce(_gemm(a, b, bias), group_name)


def all_gather(a_shard: torch.Tensor, world_size: int, group_name: str) -> torch.Tensor:
    return _wait(_c10d.all_gather_into_tensor(a_shard.contiguous(), world_size, group_name))


def all_gather_gemm(a_shard: torch.Tensor, bs: list[torch.Tensor], world_size: int, group_name: str,
                    return_a: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    a_full = all_gather(a_shard, world_size, group_name)  # [world*m, K]
    outs = [torch.mm(a_full, b) for b in bs]               # each [world*m, N_i]
    return (a_full if return_a else a_full.new_empty(0)), outs


def gemm_reduce_scatter(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], world_size: int,
                        group_name: str) -> torch.Tensor:
    partial = _gemm(a, b, bias)  # [M, N], M divisible by world_size
    return _wait(_c10d.reduce_scatter_tensor(partial.contiguous(), "sum", world_size, group_name))


def all_reduce_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``all_reduce(x)`` -> ``+ residual`` -> RMSNorm, in exactly the operations and casts of HF's
    ``Qwen3RMSNorm`` / ``LlamaRMSNorm`` after HF's decoder-layer ``hidden_states = residual +
    hidden_states``. Returns ``(normed, new_residual)``.

    * The residual add runs in the input dtype (bf16 stays bf16: the sum is rounded before the
      norm upcasts it), like HF. It is written ``residual + reduced`` as in HF; IEEE-754 addition
      is commutative (``a + b`` and ``b + a`` round identically), so operand order cannot change
      a bit -- only the place of the rounding (in the input dtype, after the full reduction)
      does, and that is kept.
    * The variance is the fp32 mean of squares over the last dim; ``eps`` is added to the
      variance inside the rsqrt; the fp32 result is cast back to the input dtype *before* the
      multiplication by ``weight`` (so ``weight * h`` runs in the input dtype when the weight has
      it).
    """
    return rmsnorm_after_all_reduce(all_reduce(x, group_name), residual, weight, eps)


def gemm_all_reduce_rmsnorm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                            weight: torch.Tensor, eps: float, group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``all_reduce_rmsnorm(a @ b + bias)``; the GEMM's [M, N] output takes ``residual``'s shape."""
    return all_reduce_rmsnorm(_gemm(a, b, bias).reshape(residual.shape), residual, weight, eps, group_name)


def rmsnorm_after_all_reduce(reduced: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of ``all_reduce_rmsnorm`` after the all-reduce (its docstring)."""
    new_residual = residual + reduced
    input_dtype = new_residual.dtype
    h = new_residual.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    normed = weight * h.to(input_dtype)
    return normed, new_residual
