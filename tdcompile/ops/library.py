"""Definitions of the ``tdist::*`` ops: schema, fake impl, default (reference) impl.

The ops are defined on a plain ``torch.library.Library`` rather than with
``torch.library.custom_op``: a call of an op defined by ``custom_op`` passes through three
Python layers (its autograd wrapper, a redispatch and its backend wrapper with an aliasing
check) before reaching the kernel; an op defined here goes from the C++ dispatcher straight to
the registered function.  These ops run in Inductor's un-graphed wrapper code, where that host
time counts: a replayed ``all_reduce`` call takes 12.5 us of host time against 16.6 for the same
kernel behind a ``custom_op`` (2-core CPU, ``scripts/host_path_cpu.py``,
``benchmarks/results/host-path-cpu-20261127-1913.json``).  They have no autograd formula
(inference ops; the pass inserts them after AOTAutograd).

The default implementation of each op, used on every device that has no specific kernel
registered, is the reference (``reference.py``); ``cuda.py`` registers the CUDA
implementations behind the same ops.
"""
from __future__ import annotations

from typing import Optional

import torch

from tdcompile.config import check_impl as _check_impl
from tdcompile.ops import reference as ref

LIB = torch.library.Library("tdist", "DEF")

SCHEMAS = {
    "all_reduce": "(Tensor x, str group_name, str impl='auto') -> Tensor",
    "gemm_all_reduce": "(Tensor a, Tensor b, Tensor? bias, str group_name, str impl='auto') -> Tensor",
    "all_gather_gemm": "(Tensor a_shard, Tensor[] bs, int world_size, str group_name, bool return_a=False, "
                       "str impl='auto') -> (Tensor, Tensor[])",
    "gemm_reduce_scatter": "(Tensor a, Tensor b, Tensor? bias, int world_size, str group_name, "
                           "str impl='auto') -> Tensor",
    "all_reduce_rmsnorm": "(Tensor x, Tensor residual, Tensor weight, float eps, str group_name, "
                          "str impl='auto') -> (Tensor, Tensor)",
    "gemm_all_reduce_rmsnorm": "(Tensor a, Tensor b, Tensor? bias, Tensor residual, Tensor weight, float eps, "
                               "str group_name, str impl='auto') -> (Tensor, Tensor)",
}
"""op -> schema (without the name).  Every op returns new tensors (no aliasing, no mutation)."""
OP_NAMES = tuple(SCHEMAS)


def _op(name: str, reference, fake):
    """Define ``tdist::name`` with ``reference`` as its implementation on every device (until a
    device registers its own) and ``fake`` for tracing."""
    LIB.define(name + SCHEMAS[name])
    LIB.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"tdist::{name}", fake, lib=LIB)


def _mm_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))


# ---------------------------------------------------------------- all_reduce
def all_reduce(x: torch.Tensor, group_name: str, impl: str = "auto") -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group_name``."""
    _check_impl(impl)
    return ref.all_reduce(x, group_name)


def _all_reduce_fake(x, group_name, impl="auto"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ----------------------------------------------------------- gemm_all_reduce
def gemm_all_reduce(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], group_name: str,
                    impl: str = "auto") -> torch.Tensor:
    """``all_reduce(a @ b + bias)``; ``a`` [M, K], ``b`` [K, N], ``bias`` [N] or None."""
    _check_impl(impl)
    return ref.gemm_all_reduce(a, b, bias, group_name)


def _gemm_all_reduce_fake(a, b, bias, group_name, impl="auto"):
    return _mm_out(a, b)


# ----------------------------------------------------------- all_gather_gemm
def all_gather_gemm(a_shard: torch.Tensor, bs: list[torch.Tensor], world_size: int, group_name: str,
                    return_a: bool = False, impl: str = "auto") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Gather ``a_shard`` [m, K] from every rank along dim 0 into A [world*m, K] and
    return ``(A if return_a else empty, [A @ b for b in bs])``."""
    _check_impl(impl)
    return ref.all_gather_gemm(a_shard, bs, world_size, group_name, return_a)


def _all_gather_gemm_fake(a_shard, bs, world_size, group_name, return_a=False, impl="auto"):
    m_full = a_shard.shape[0] * world_size
    a_full = a_shard.new_empty((m_full, a_shard.shape[1])) if return_a else a_shard.new_empty(0)
    return a_full, [a_shard.new_empty((m_full, b.shape[1])) for b in bs]


# ------------------------------------------------------- gemm_reduce_scatter
def gemm_reduce_scatter(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], world_size: int,
                        group_name: str, impl: str = "auto") -> torch.Tensor:
    """``reduce_scatter(a @ b + bias)`` along dim 0: rank r gets rows [r*M/w, (r+1)*M/w)."""
    _check_impl(impl)
    return ref.gemm_reduce_scatter(a, b, bias, world_size, group_name)


def _gemm_reduce_scatter_fake(a, b, bias, world_size, group_name, impl="auto"):
    torch._check(a.shape[0] % world_size == 0, lambda: "gemm_reduce_scatter: M must divide by world_size")
    return a.new_empty((a.shape[0] // world_size, b.shape[1]))


# ------------------------------------------------------- all_reduce_rmsnorm
def all_reduce_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str,
                       impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = residual + all_reduce(x)``; ``normed = RMSNorm(new_residual) * weight`` exactly
    as HF's ``Qwen3RMSNorm`` computes it (fp32 variance, cast back before the weight). ``x`` and
    ``residual`` have the same shape and dtype, ``weight`` is ``[hidden]`` (the last dim).
    Returns ``(normed, new_residual)``."""
    _check_impl(impl)
    return ref.all_reduce_rmsnorm(x, residual, weight, eps, group_name)


def _all_reduce_rmsnorm_fake(x, residual, weight, eps, group_name, impl="auto"):
    torch._check(x.shape == residual.shape, lambda: "all_reduce_rmsnorm: x and residual must have the same shape")
    new_residual = torch.empty_like(residual, dtype=torch.promote_types(x.dtype, residual.dtype),
                                    memory_format=torch.contiguous_format)
    normed_shape = torch.broadcast_shapes(weight.shape, new_residual.shape)
    normed = new_residual.new_empty(normed_shape, dtype=torch.promote_types(weight.dtype, new_residual.dtype))
    return normed, new_residual


# -------------------------------------------------- gemm_all_reduce_rmsnorm
def gemm_all_reduce_rmsnorm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                            weight: torch.Tensor, eps: float, group_name: str,
                            impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``all_reduce_rmsnorm(a @ b + bias, residual, weight, eps)`` with the GEMM inside the op, so
    the fused variants let cuBLAS write straight into the symmetric buffer the all-reduce reads
    (zero copy). ``a`` [M, K], ``b`` [K, N]; ``residual`` has M*N elements and last dim N (any
    leading shape: the outputs take it). Returns ``(normed, new_residual)``."""
    _check_impl(impl)
    return ref.gemm_all_reduce_rmsnorm(a, b, bias, residual, weight, eps, group_name)


def _gemm_all_reduce_rmsnorm_fake(a, b, bias, residual, weight, eps, group_name, impl="auto"):
    torch._check(residual.shape[-1] == b.shape[1],
                 lambda: "gemm_all_reduce_rmsnorm: residual's last dim must be the GEMM's N")
    new_residual = torch.empty_like(residual, memory_format=torch.contiguous_format)
    return torch.empty_like(new_residual), new_residual


for _name in OP_NAMES:
    _op(_name, globals()[_name], globals()[f"_{_name}_fake"])
