"""The ``fused`` variants of ``tdist::gemm_all_reduce``: how each runs and what it needs first.

``impl = "fused[:variant]"`` (``config`` vocabulary) -> one entry here, each a pair of
``prepare(ws, a, b, bias, group_name) -> reason or None`` (run once per input signature by
every rank together, inside ``ops.cuda.ready``: may allocate symmetric regions, a collective)
and ``run(ws, a, b, bias, group_name) -> out``:

================  =====================================================================
``fused``         tdcompile's Triton GEMM + tile-wise all-reduce (``kernels/gemm_all_reduce.py``)
``one_shot``,     zero copy: cuBLAS writes into this rank's symmetric input area, the
``two_shot``      all-reduce kernel reads it in place (``kernels/all_reduce.py``)
``lamport``       cuBLAS, then the barrier-free push all-reduce (``kernels/all_reduce_lamport.py``)
``lamport2``      cuBLAS, then its two-shot form (``kernels/all_reduce_lamport2.py``)
``pipe<C>[_nccl]`` row chunks on two streams, each all-reduced beside the next GEMM chunk
                  (``ops/overlap.py``)
``ce<C>[s<S>]``   row chunks, each reduced on the copy engine beside the next GEMM chunk
                  (``kernels/gemm_all_reduce_ce.py``); ``s<S>``: the GEMMs leave S SMs free
``chain<L>``      W*L row chunks whose partial sums pass along a ring, each rank adding its
                  product in cuBLAS's epilogue (``kernels/gemm_all_reduce_chain.py``)
================  =====================================================================
"""
from __future__ import annotations

from typing import Optional

import torch

from tdcompile.ops import overlap


def _gemm(a, b, bias, out=None):
    if out is None:
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)


def writes_out(v: Optional[str]) -> bool:
    """Whether variant ``v`` writes into a caller's ``out`` (so ``ops.cuda`` can allocate it and
    replay the call as an op graph: ``ops/op_graphs.py``)."""
    return v in ("one_shot", "two_shot") or overlap.parse_ce(v) is not None or overlap.parse_chain(v) is not None


def run(v: Optional[str], ws, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor],
        group_name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out``: where the variants of ``writes_out`` write [M, N]."""
    if v is None:                     # the Triton GEMM + tile-wise all-reduce kernel
        from tdcompile.kernels.gemm_all_reduce import gemm_all_reduce
        return gemm_all_reduce(ws, a, b, bias)
    if v == "lamport":                # cuBLAS, then the barrier-free push all-reduce (in place)
        from tdcompile.kernels.all_reduce_lamport import all_reduce_lamport
        y = _gemm(a, b, bias)                                             # [M, N]
        return all_reduce_lamport(ws, y, out=y)
    if v == "lamport2":               # cuBLAS, then the barrier-free two-shot push all-reduce (in place)
        from tdcompile.kernels.all_reduce_lamport2 import all_reduce_lamport2
        y = _gemm(a, b, bias)                                             # [M, N]
        return all_reduce_lamport2(ws, y, out=y)
    ce = overlap.parse_ce(v)
    if ce is not None:                # cuBLAS chunks, each reduced on the copy engine during the next
        from tdcompile.kernels.gemm_all_reduce_ce import gemm_all_reduce_ce
        return gemm_all_reduce_ce(ws, a, b, bias, overlap.chunk_bounds(a.shape[0], ce), out=out,
                                  sm_carveout=overlap.ce_carveout(v))
    chain = overlap.parse_chain(v)
    if chain is not None:             # partial sums along a ring, added in cuBLAS's epilogue
        from tdcompile.kernels.gemm_all_reduce_chain import gemm_all_reduce_chain
        return gemm_all_reduce_chain(ws, a, b, bias, overlap.chunk_bounds(a.shape[0], ws.world * chain), out=out)
    pipe = overlap.parse(v)
    if pipe is not None:              # cuBLAS chunks overlapped with the all-reduce of the previous one
        chunks, reducer = pipe
        red = overlap.nccl_reducer(group_name) if reducer == "nccl" else overlap.tdist_reducer(ws)
        return overlap.gemm_all_reduce(a, b, bias, chunks, red, ws.side)
    # zero copy: cuBLAS writes the GEMM output straight into this rank's symmetric
    # buffer, which the all-reduce kernel then reads in place (no copy-in pass)
    from tdcompile.kernels.all_reduce import all_reduce, symm_input
    buf = symm_input(ws, (a.shape[0], b.shape[1]), a.dtype)               # [M, N] symmetric
    _gemm(a, b, bias, out=buf)
    return all_reduce(ws, buf, out=out, variant=v)


def prepare(v: Optional[str], ws, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[str]:
    """Why variant ``v`` cannot take these inputs on this rank, else None (regions allocated)."""
    out_shape = (a.shape[0], b.shape[1])
    if v is None:
        from tdcompile.kernels.gemm_all_reduce import unsupported_reason
        return unsupported_reason(ws, a, b, bias)
    if v in ("lamport", "lamport2"):
        from tdcompile.kernels import all_reduce_lamport as l1, all_reduce_lamport2 as l2
        return (l1 if v == "lamport" else l2).prepare(ws, torch.empty(out_shape, dtype=a.dtype, device=a.device))
    ce = overlap.parse_ce(v)
    if ce is not None:
        from tdcompile.kernels import gemm_all_reduce_ce as k
        bounds = overlap.chunk_bounds(a.shape[0], ce)
        if bounds is None:
            return f"M={a.shape[0]} too small for {ce} chunks of >= {overlap.MIN_CHUNK_ROWS} rows"
        reason = k.unsupported_reason(ws, a, b, bounds, bias, sm_carveout=overlap.ce_carveout(v))
        if reason is None:
            k.regions(ws, b.shape[1], a.element_size())                   # allocate now (collective)
        return reason
    chain = overlap.parse_chain(v)
    if chain is not None:
        from tdcompile.kernels import gemm_all_reduce_chain as k
        bounds = overlap.chunk_bounds(a.shape[0], ws.world * chain)
        if bounds is None:
            return f"M={a.shape[0]} too small for {ws.world * chain} chunks of >= {overlap.MIN_CHUNK_ROWS} rows"
        reason = k.unsupported_reason(ws, a, b, bounds, bias)
        if reason is None:
            k.region(ws, b.shape[1], a.element_size())                      # allocate now (collective)
        return reason
    pipe = overlap.parse(v)
    if pipe is not None:
        reason = overlap.unsupported_reason(a, b, v)
        if reason is None and pipe[1] == "tdist":
            from tdcompile.kernels.all_reduce import regions, unsupported_reason
            lo, hi = overlap.chunk_bounds(a.shape[0], pipe[0])[0]
            reason = unsupported_reason(ws, torch.empty((hi - lo, b.shape[1]), dtype=a.dtype, device=a.device))
            if reason is None:
                regions(ws, b.shape[1], (hi - lo) * b.shape[1])           # allocate now (collective)
        return reason
    from tdcompile.kernels.all_reduce import symm_input, unsupported_reason
    probe = torch.empty(out_shape, dtype=a.dtype, device=a.device)
    reason = unsupported_reason(ws, probe)
    if reason is None:
        symm_input(ws, probe.shape, a.dtype)                              # allocate the regions now (collective)
    return reason
