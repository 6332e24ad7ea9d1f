"""CUDA implementations of the ``tdist::*`` ops.

``impl`` dispatch:
  * ``"unfused"``: the reference sequence (on CUDA: NCCL collective + cuBLAS GEMM);
  * ``"fused"``: the Triton kernels over symmetric memory (``tdcompile.kernels``), falling
    back to unfused with a logged reason (logger ``tdcompile.ops``, once per reason) when
    the inputs are unsupported (dtype, shapes over the workspace, world size, no P2P,
    kernels or Triton unavailable, first call inside CUDA-graph capture, ...);
  * ``"auto"``: ``tdcompile.cost_model.decide_at_runtime`` picks one of the two from the
    actual shapes.

Every fallback reason depends only on shapes, dtypes and the group, so all ranks take the
same path.  Kernel timeouts (a peer that never arrived) raise ``RuntimeError`` and are
never swallowed.  Importing this module does not import Triton.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from tdcompile.ops import reference as ref

log = logging.getLogger("tdcompile.ops")
_NOTED: set = set()
_DISABLED: dict = {}      # group_name -> reason the workspace could not be created


def _note(op: str, reason: str, level=logging.INFO) -> None:
    key = (op, reason)
    if key not in _NOTED:
        _NOTED.add(key)
        log.log(level, "tdist::%s: running unfused: %s", op, reason)


def _world_size(group_name: str) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group_name).size()


def _decide(op: str, impl: str, *, m: int, n: int, k: int, world_size: int, dtype) -> str:
    if impl != "auto":
        return impl
    try:
        from tdcompile.cost_model import decide_at_runtime
    except (ImportError, AttributeError) as e:
        _note(op, f"impl='auto' but the cost model is unavailable ({e})", logging.DEBUG)
        return "unfused"
    return decide_at_runtime(op, m=m, n=n, k=k, world_size=world_size, dtype=dtype)


def _workspace(op: str, group_name: str):
    """The group's kernel workspace, or None (reason logged)."""
    if group_name in _DISABLED:
        _note(op, _DISABLED[group_name])
        return None
    try:
        from tdcompile.kernels import symm
        import triton  # noqa: F401
        return symm.get_workspace(group_name)
    except Exception as e:  # noqa: BLE001  (ImportError, ValueError, P2P/rendezvous failures)
        from tdcompile.kernels.symm import _Unsupported
        reason = f"fused kernels unavailable for group {group_name!r}: {type(e).__name__}: {e}"
        if not isinstance(e, _Unsupported):       # permanent: do not retry every call
            _DISABLED[group_name] = reason
        _note(op, reason)
        return None


def _fused(op: str, group_name: str, launch):
    """Run ``launch(ws)``; None when the fused path does not apply (reason logged)."""
    ws = _workspace(op, group_name)
    if ws is None:
        return None
    from tdcompile.kernels.symm import _Unsupported
    try:
        return launch(ws)
    except _Unsupported as e:
        _note(op, str(e))
        return None


# ---------------------------------------------------------------------------- registrations
@torch.library.register_kernel("tdist::all_reduce", "cuda")
def _all_reduce_cuda(x: torch.Tensor, group_name: str, impl: str = "auto") -> torch.Tensor:
    n = x.shape[-1] if x.dim() else 1
    ws_n = _world_size(group_name)
    if _decide("all_reduce", impl, m=x.numel() // max(n, 1), n=n, k=0, world_size=ws_n, dtype=x.dtype) == "fused":
        def launch(ws):
            from tdcompile.kernels.all_reduce import all_reduce
            return all_reduce(ws, x)
        out = _fused("all_reduce", group_name, launch)
        if out is not None:
            return out
    return ref.all_reduce(x, group_name)


@torch.library.register_kernel("tdist::gemm_all_reduce", "cuda")
def _gemm_all_reduce_cuda(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], group_name: str,
                          impl: str = "auto") -> torch.Tensor:
    if _decide("gemm_all_reduce", impl, m=a.shape[0], n=b.shape[1], k=a.shape[1],
               world_size=_world_size(group_name), dtype=a.dtype) == "fused":
        def launch(ws):
            from tdcompile.kernels.gemm_all_reduce import gemm_all_reduce
            return gemm_all_reduce(ws, a, b, bias)
        out = _fused("gemm_all_reduce", group_name, launch)
        if out is not None:
            return out
    return ref.gemm_all_reduce(a, b, bias, group_name)


@torch.library.register_kernel("tdist::all_gather_gemm", "cuda")
def _all_gather_gemm_cuda(a_shard: torch.Tensor, bs: list[torch.Tensor], world_size: int, group_name: str,
                          return_a: bool = False, impl: str = "auto") -> tuple[torch.Tensor, list[torch.Tensor]]:
    if _decide("all_gather_gemm", impl, m=a_shard.shape[0] * world_size, n=sum(b.shape[1] for b in bs),
               k=a_shard.shape[1], world_size=world_size, dtype=a_shard.dtype) == "fused":
        def launch(ws):
            from tdcompile.kernels.all_gather_gemm import all_gather_gemm
            from tdcompile.kernels.symm import _Unsupported
            if ws.world != world_size:
                raise _Unsupported(f"world_size {world_size} != group size {ws.world}")
            return all_gather_gemm(ws, a_shard, list(bs), return_a)
        out = _fused("all_gather_gemm", group_name, launch)
        if out is not None:
            return out
    return ref.all_gather_gemm(a_shard, bs, world_size, group_name, return_a)


@torch.library.register_kernel("tdist::gemm_reduce_scatter", "cuda")
def _gemm_reduce_scatter_cuda(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], world_size: int,
                              group_name: str, impl: str = "auto") -> torch.Tensor:
    if _decide("gemm_reduce_scatter", impl, m=a.shape[0], n=b.shape[1], k=a.shape[1], world_size=world_size,
               dtype=a.dtype) == "fused":
        def launch(ws):
            from tdcompile.kernels.gemm_reduce_scatter import gemm_reduce_scatter
            from tdcompile.kernels.symm import _Unsupported
            if ws.world != world_size:
                raise _Unsupported(f"world_size {world_size} != group size {ws.world}")
            return gemm_reduce_scatter(ws, a, b, bias)
        out = _fused("gemm_reduce_scatter", group_name, launch)
        if out is not None:
            return out
    return ref.gemm_reduce_scatter(a, b, bias, world_size, group_name)


def check_errors(group_name: str | None = None, sync: bool = True) -> None:
    """Raise ``RuntimeError`` (op and rank named) if a fused kernel timed out waiting for a peer."""
    from tdcompile.kernels import symm
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    for name, ws in list(symm._WORKSPACES.items()):
        if group_name is None or name == group_name:
            ws.check()
