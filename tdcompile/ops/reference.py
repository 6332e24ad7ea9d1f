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
