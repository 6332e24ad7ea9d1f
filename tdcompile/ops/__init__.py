"""The ``tdist::*`` custom ops: the contract between the compiler passes and the kernels.

Layers::

    passes (emit torch.ops.tdist.*)  ->  ops (this package)  ->  kernels (Triton, CUDA only)

Every op has
  * a fake (meta) implementation, used while tracing and by Inductor,
  * a **reference implementation** built from functional collectives + matmul
    (``reference.py``). It runs on any device and process-group backend (gloo on CPU).
    It is the correctness oracle and the CPU path -- never a performance path.
  * a CUDA implementation (``cuda.py``) that calls the fused Triton kernels over
    symmetric memory when they apply, and otherwise the unfused NCCL + cuBLAS sequence.

Schemas (all matrices are 2-D, row-major semantics; ``b`` is the ``[K, N]`` operand,
i.e. the transposed ``nn.Linear`` weight exactly as it appears in the ATen graph)::

    all_reduce(x, group_name, impl)                          -> sum over ranks of x
    gemm_all_reduce(a[M,K], b[K,N], bias[N]?, group_name, impl)
                                                             -> all_reduce(a @ b + bias)
    all_gather_gemm(a_shard[m,K], bs[K,N_i]*, world_size, group_name, return_a, impl)
                                                             -> (A or empty, [A @ b_i])
        where A = cat of every rank's a_shard along dim 0   (A is [world*m, K])
    gemm_reduce_scatter(a[M,K], b[K,N], bias[N]?, world_size, group_name, impl)
                                                             -> reduce_scatter(a @ b + bias, dim 0)
    all_reduce_rmsnorm(x, residual, weight[N], eps, group_name, impl)
                                                             -> (normed, new_residual): HF's residual
        add + RMSNorm after all_reduce(x)                       (new_residual = residual + sum)
    gemm_all_reduce_rmsnorm(a[M,K], b[K,N], bias[N]?, residual, weight[N], eps, group_name, impl)
                                                             -> all_reduce_rmsnorm(a @ b + bias, ...)

``impl`` is the compiler's choice, kept in the graph so dumps show it, in the vocabulary of
``tdcompile.config``: ``"unfused"`` (NCCL + cuBLAS), ``"fused"`` (our Triton kernels),
``"symm_mem"`` (torch symmetric memory), each optionally ``:variant``, or ``"auto"`` (the
measured table's choice for the actual M; used for dynamic M and shapes not measured yet).
Off CUDA every ``impl`` runs the reference implementation.
"""
from tdcompile.ops import library  # noqa: F401  (registers the ops)
from tdcompile.ops import cuda  # noqa: F401  (CUDA implementations; imports no Triton until called)
from tdcompile.ops.library import OP_NAMES

__all__ = ["OP_NAMES"]
